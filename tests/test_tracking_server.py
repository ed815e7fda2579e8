"""Training against a real `mlflow server` (sqlite store, proxied artifacts, one worker): the run read back over REST,
the best checkpoint registered and fetched back as models:/<name>/<version>, and a server that dies mid-run."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline import project_root
from pipeline.core.errors import InputError
from pipeline.inference.predictor import checkpoints
from pipeline.models import checkpoint
from pipeline.tracking.runs import HTTP_SETTINGS, MLflowTracker, NullTracker
from pipeline.training.run import train
from tests.conftest import tiny_config

MLFLOW = Path(sys.executable).parent / "mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on a free loopback port, as `make mlflow-server` runs it, with its store under `root`."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "mlartifacts"
        self.log = root / "server.log"
        root.mkdir(parents=True, exist_ok=True)
        command = [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--serve-artifacts",
                   "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", "1"]
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner process beside the worker
        with self.log.open("w") as log:
            # A session of its own: the server's uvicorn worker is a child; kill() ends the whole group.
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError):  # not listening yet
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"mlflow server did not come up on {self.uri}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.25)

    def get(self, endpoint: str, **query) -> dict:
        with urllib.request.urlopen(f"{self.uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}",
                                    timeout=30) as r:
            return json.load(r)

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    """Starts servers on demand; every one is killed at teardown, whatever the test did."""
    started = []

    def start() -> Server:
        started.append(Server(tmp_path / f"server{len(started)}"))
        return started[-1]

    yield start
    for s in started:
        s.kill()


@pytest.fixture(autouse=True)
def http_settings_restored():
    """MLflowTracker.start sets MLflow's HTTP retry settings in os.environ; put them back as they were."""
    before = {k: os.environ.get(k) for k in HTTP_SETTINGS}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def trackers(monkeypatch):
    """Every MLflowTracker built during the test (train() keeps its own out of reach)."""
    made = []
    init = MLflowTracker.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(MLflowTracker, "__init__", recording)
    return made


def warnings_about(uri: str, stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"warning: MLflow tracking at {uri} failed")]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_through_a_server_is_read_back_over_rest_registered_and_fetched(server, tiny_phantom, tmp_path,
                                                                                 trackers, monkeypatch):
    srv = server()
    run_dir = tmp_path / "run"
    cfg = tiny_config(tiny_phantom, run_dir, overrides=[f"tracking.uri={srv.uri}", "tracking.register=true",
                                                        "tracking.model_name=phantom-seg"])
    result = train(cfg)

    run = srv.get("runs/get", run_id=result["run_id"])["run"]
    assert run["info"]["run_name"] == result["run_name"] == "UNet_Adam_DiceLoss"
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["val_dice_mean"] == pytest.approx(result["best"]["val_dice_mean"])
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert {"git_commit", "seed", "mlflow.source.name"} <= tags.keys()
    listed = srv.get("artifacts/list", run_id=result["run_id"], path="checkpoints")
    assert {f["path"] for f in listed["files"]} == {"checkpoints/best.pt", "checkpoints/last.pt"}
    # proxied: the client uploaded through the server, which wrote under --artifacts-destination
    stored = list(srv.artifacts.rglob(f"{result['run_id']}/artifacts/checkpoints/best.pt"))
    assert len(stored) == 1 and stored[0].read_bytes() == (run_dir / "checkpoints" / "best.pt").read_bytes()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1 and lines[0]["val_dice_mean"] == pytest.approx(result["best"]["val_dice_mean"])

    # register: train.py may do it itself; otherwise the run's own tracker does it now, as train.py would
    (tracker,) = trackers
    best = run_dir / "checkpoints" / "best.pt"
    registered = srv.get("model-versions/search", filter="name = 'phantom-seg'").get("model_versions", [])
    model_uri = "models:/phantom-seg/1" if registered else tracker.register(best)
    assert model_uri == "models:/phantom-seg/1"
    version = srv.get("model-versions/get", name="phantom-seg", version="1")["model_version"]
    # the version is the run's MLflow model (a LoggedModel), not a bare file
    (model,) = mlflow.MlflowClient(srv.uri).search_logged_models(
        [run["info"]["experiment_id"]], filter_string=f"source_run_id = '{result['run_id']}'")
    assert version["run_id"] == result["run_id"] and version["source"] == f"models:/{model.model_id}"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
    for uri in (model_uri, "models:/phantom-seg/latest"):
        (path,) = checkpoints(uri, cache=tmp_path / "registry")
        assert path.is_relative_to(tmp_path / "registry") and path.name == "best.pt"
        bundle = checkpoint.load(path)  # torch.load(weights_only=True)
        assert same_weights(bundle["state_dict"], checkpoint.load(best)["state_dict"])
        assert bundle["run_id"] == result["run_id"]
    with pytest.raises(InputError, match="models:/phantom-seg/7"):
        checkpoints("models:/phantom-seg/7", cache=tmp_path / "registry")


@pytest.mark.slow  # a server killed mid-run: `make test-slow`
def test_a_server_gone_mid_run_warns_once_and_training_finishes(server, tiny_phantom, tmp_path, capfd, monkeypatch):
    srv = server()
    killed = {}
    log_metrics = MLflowTracker.log_metrics

    def then_kill(self, metrics, step):  # the server dies right after epoch 1 has been logged
        log_metrics(self, metrics, step)
        if step == 1 and not killed:
            srv.kill()
            killed["at"] = time.monotonic()

    monkeypatch.setattr(MLflowTracker, "log_metrics", then_kill)
    run_dir = tmp_path / "run"
    cfg = tiny_config(tiny_phantom, run_dir,
                      overrides=[f"tracking.uri={srv.uri}", "trainer.max_epochs=3", "tracking.register=true"])
    result = train(cfg)  # returns normally
    after_kill = time.monotonic() - killed["at"]

    assert result["epochs"] == 3 and result["run_id"] is not None  # the run was opened before the server went
    for name in ("best.pt", "last.pt"):
        assert checkpoint.load(run_dir / "checkpoints" / name)["config"]["trainer"]["max_epochs"] == 3
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["epoch"] == 3
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted({line["step"] for line in lines if "train_loss" in line}) == [1, 2, 3]
    assert any("best_val_dice_mean" in line for line in lines)
    stderr = capfd.readouterr().err
    (warning,) = warnings_about(srv.uri, stderr)  # exactly once, one line
    assert "log_metrics" in warning and str(run_dir) in warning
    assert after_kill < 60, f"{after_kill:.0f} s after the server went: retrying instead of giving up"


def test_no_server_at_start_warns_once_and_trains_untracked(tiny_phantom, tmp_path, capfd):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = train(tiny_config(tiny_phantom, tmp_path, overrides=[f"tracking.uri={uri}", "tracking.register=true"]))
    assert result["run_id"] is None and (tmp_path / "checkpoints" / "best.pt").is_file()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 1]
    (warning,) = warnings_about(uri, capfd.readouterr().err)
    assert " start " in warning
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_SETTINGS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


def test_register_on_the_sqlite_store_and_infer_resolves_models_uri(tiny_phantom, tmp_path, trackers, mlflow_store,
                                                                    monkeypatch):
    name = f"phantom-{uuid.uuid4().hex[:8]}"
    result = train(tiny_config(tiny_phantom, tmp_path,
                               overrides=["tracking.register=true", f"tracking.model_name={name}"]))
    (tracker,) = trackers
    best = tmp_path / "checkpoints" / "best.pt"
    existing = mlflow.MlflowClient(mlflow_store).search_model_versions(f"name = '{name}'")
    model_uri = f"models:/{name}/1" if existing else tracker.register(best)
    assert model_uri == f"models:/{name}/1"
    client = mlflow.MlflowClient(mlflow_store)
    assert client.get_model_version(name, "1").run_id == result["run_id"]
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["tracking.register"] == "True"
    assert {"config.yaml", "splits.json", "checkpoints"} <= {a.path for a in client.list_artifacts(result["run_id"])}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    paths = checkpoints([model_uri, str(best)], cache=tmp_path / "registry")  # an ensemble may mix both
    assert len(paths) == 2 and same_weights(checkpoint.load(paths[0])["state_dict"],
                                            checkpoint.load(best)["state_dict"])


def test_register_on_a_store_named_in_the_config_alone(tiny_phantom, tmp_path, monkeypatch):
    """`make train tracking.register=true` on a fresh machine: no MLFLOW_TRACKING_URI, the store only in the config
    (MLflow's registry looks a model's source up in its global store: it once missed the run's model there)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)  # where MLflow's own default store would appear
    store = f"sqlite:///{tmp_path}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    result = train(tiny_config(tiny_phantom, tmp_path / "run", overrides=[
        f"tracking.uri={store}", "tracking.register=true", "tracking.model_name=fresh", "tracking.alias=champion"]))
    assert result["model_uri"] == "models:/fresh/1"
    version = mlflow.MlflowClient(store).get_model_version_by_alias("fresh", "champion")
    assert version.run_id == result["run_id"] and version.source.startswith("models:/m-")
    assert not (tmp_path / "mlflow.db").exists() and "MLFLOW_TRACKING_URI" not in os.environ


@pytest.mark.slow
def test_infer_cli_takes_a_models_uri(tiny_phantom, tmp_path, trackers, mlflow_store):
    name = f"phantom-cli-{uuid.uuid4().hex[:8]}"
    train(tiny_config(tiny_phantom, tmp_path, overrides=["tracking.register=true", f"tracking.model_name={name}"]))
    if not mlflow.MlflowClient(mlflow_store).search_model_versions(f"name = '{name}'"):
        trackers[0].register(tmp_path / "checkpoints" / "best.pt")
    image = sorted((tiny_phantom / "imagesTr").iterdir())[0]
    cache = project_root() / "outputs" / "registry" / name  # the CLI's default cache: removed afterwards
    try:
        for ckpt, rc in ((f"models:/{name}/latest", 0), (f"models:/{name}/2", 1)):
            done = subprocess.run([sys.executable, "-m", "pipeline.infer", f"ckpt={ckpt}", f"input={image}",
                                   f"output={tmp_path}/pred", f"hydra.run.dir={tmp_path}/hydra"],
                                  capture_output=True, text=True, cwd=project_root(),
                                  env=os.environ | {"MLFLOW_TRACKING_URI": mlflow_store})
            assert done.returncode == rc, done.stderr[-2000:]
        # version 1 is the run's MLflow model: its checkpoint lies in the model's artifacts/
        assert (tmp_path / "pred" / image.name).is_file() and (cache / "1" / "artifacts" / "best.pt").is_file()
        assert done.stderr.strip().splitlines()[-1].startswith(f"error: models:/{name}/2: "
                                                               "cannot fetch it from the registry")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if cache.parent.is_dir() and not any(cache.parent.iterdir()):
            cache.parent.rmdir()


def test_register_off_and_null_tracker_register_nothing(tmp_path, mlflow_store):
    tracker = MLflowTracker(mlflow_store, "register-off", local_dir=str(tmp_path))
    tracker.start("r", {"a": 1}, {})
    assert tracker.register(tmp_path / "missing.pt") is None
    tracker.log_metrics({"val_dice_mean": 0.5}, step=1)
    tracker.finish()
    again = MLflowTracker(mlflow_store, "register-off", local_dir=str(tmp_path))  # resume: the same run continued
    again.start("r", {}, {}, run_id=tracker.run_id)
    assert mlflow.MlflowClient(mlflow_store).get_run(tracker.run_id).info.status == "RUNNING"
    again.log_metrics({"val_dice_mean": 0.75}, step=2)
    again.finish("KILLED")
    null = NullTracker(local_dir=str(tmp_path / "null"))
    null.log_metrics({"val_dice_mean": 0.25}, step=2)
    assert null.register(tmp_path / "x.pt") is None
    assert json.loads((tmp_path / "null" / "metrics.jsonl").read_text())["val_dice_mean"] == 0.25
    run = mlflow.MlflowClient(mlflow_store).get_run(tracker.run_id)
    assert run.info.status == "KILLED" and run.data.params == {"a": "1"} and run.data.metrics == {"val_dice_mean": 0.75}
    # artifacts beside the sqlite store, not in the cwd's outputs/ (tests once filled the repo's outputs/mlartifacts)
    store = Path(mlflow_store.removeprefix("sqlite:///"))
    assert run.info.artifact_uri.startswith((store.parent / "mlartifacts" / "register-off").as_uri() + "/")
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_reopening_an_unknown_run_still_raises(mlflow_store, tmp_path):
    """evaluate.py falls back to a new run when the checkpoint's run lives in another store."""
    with pytest.raises(mlflow.exceptions.MlflowException):
        MLflowTracker(mlflow_store, "elsewhere", local_dir=str(tmp_path)).start("r", {}, {}, run_id=uuid.uuid4().hex)


@pytest.mark.parametrize("uri", ["models:/", "models:/only-a-name", "models:/no-such-model/1"])
def test_bad_models_uri_is_an_input_error(uri, tmp_path, mlflow_store):
    with pytest.raises(InputError, match="models:/"):
        checkpoints(uri, cache=tmp_path)
