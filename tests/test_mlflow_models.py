"""MLflow 3 as its users use it, against a live `mlflow server` on 127.0.0.1: the run's pyfunc model loaded and
served (`mlflow models serve`), voxel for voxel as pipeline.infer; the registry's aliases; dataset inputs; evaluation as
its own run; system metrics; the UI's runs table in headless Chromium."""

import base64
import contextlib
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import compose
from pipeline.core.errors import InputError
from pipeline.data.fingerprint import cache_key
from pipeline.evaluation.scoring import evaluate
from pipeline.inference.predictor import checkpoints, infer
from pipeline.inference.serving import INPUT, OUTPUT, decode, encode
from pipeline.models import checkpoint
from pipeline.promote import promote
from pipeline.tracking.runs import TRAINING_VIEW, using_store
from pipeline.training.run import train
from tests.conftest import tiny_config
from tests.test_evaluate import chromium
from tests.test_tracking_server import MLFLOW, Server, free_port

NAME = "phantom-served"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_phantom):
    """One server and one training through it (register=true, alias=champion), shared by the module's tests."""
    root = tmp_path_factory.mktemp("served")
    server = Server(root / "server")
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server.uri  # models:/ URIs resolve against it, as for a user's shell
    try:
        # MLflow's global URI too, which other tests' mlflow.set_tracking_uri may have left on their store
        with using_store(server.uri):
            result = train(tiny_config(tiny_phantom, root / "run", overrides=[
                f"tracking.uri={server.uri}", "tracking.register=true", f"tracking.model_name={NAME}",
                "tracking.alias=champion"]))
            yield server, result, root
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = before
        server.kill()


def label_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def test_the_run_logs_a_model_that_registers_under_an_alias_and_loads_with_pyfunc(trained, tiny_phantom, tmp_path):
    server, result, root = trained
    client = mlflow.MlflowClient(server.uri)
    assert result["model_uri"] == f"models:/{NAME}/1"
    version = client.get_model_version_by_alias(NAME, "champion")
    (model,) = client.search_logged_models([client.get_run(result["run_id"]).info.experiment_id],
                                           filter_string=f"source_run_id = '{result['run_id']}'")
    assert version.version == "1" and version.run_id == result["run_id"]
    assert version.source == f"models:/{model.model_id}"  # the run's MLflow model, not a bare file
    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    assert info.signature.inputs.input_names() == [INPUT] and info.signature.outputs.input_names() == [OUTPUT]
    requirements = Path(mlflow.artifacts.download_artifacts(f"{model.artifact_location}/requirements.txt",
                                                            dst_path=str(tmp_path))).read_text().split()
    assert requirements[0] == "torch==2.13.0" and "monai==1.6.1" in requirements  # pinned, as pyproject.toml

    image = sorted((tiny_phantom / "imagesTr").iterdir())[0]
    answer = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(pd.DataFrame({INPUT: [encode(image)]}))
    served = tmp_path / "served.nii.gz"
    served.write_bytes(decode(answer[OUTPUT][0], "answer"))
    # pipeline.infer with the same alias: the registry hands it the checkpoint inside the model
    report = infer(f"models:/{NAME}@champion", image, tmp_path / "infer")
    (written,) = report["written"]
    (ours, affine), (theirs, theirs_affine) = label_map(served), label_map(written)
    assert np.array_equal(ours, theirs) and np.allclose(affine, theirs_affine, atol=1e-6)
    assert set(np.unique(ours)) > {0}  # a label map, not an empty one


@pytest.mark.slow  # an mlflow models serve process: `make test-slow`
def test_mlflow_models_serve_answers_a_volume_and_a_bad_payload_in_one_line(trained, tiny_phantom, tmp_path):
    server, result, root = trained
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    serving = subprocess.Popen([str(MLFLOW), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager",
                                "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                               stdout=log, stderr=subprocess.STDOUT, env=os.environ | {
                                   "MLFLOW_TRACKING_URI": server.uri, "PATH": f"{MLFLOW.parent}:{os.environ['PATH']}"},
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/ping", serving, tmp_path / "serve.log")
        image = sorted((tiny_phantom / "imagesTr").iterdir())[1]
        status, body = post(f"{url}/invocations", {"dataframe_split": {"columns": [INPUT], "data": [[encode(image)]]}})
        assert status == 200, body
        (served := tmp_path / "served.nii.gz").write_bytes(decode(json.loads(body)["predictions"][0][OUTPUT], "a"))
        (written,) = infer(root / "run" / "checkpoints" / "best.pt", image, tmp_path / "infer")["written"]
        assert np.array_equal(label_map(served)[0], label_map(written)[0])

        bad = encode_bytes(b"not a volume at all")
        status, body = post(f"{url}/invocations", {"dataframe_split": {"columns": [INPUT], "data": [[bad]]}})
        assert status == 400 and "row 0: not a NIfTI file" in json.loads(body)["message"]
        status, _ = post(f"{url}/invocations", {"dataframe_split": {"columns": ["image"], "data": [["x"]]}})
        assert 400 <= status < 500
        # still serving, requests at once included (they queue: one volume at a time)
        request = {"dataframe_split": {"columns": [INPUT], "data": [[encode(image)]]}}
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: post(f"{url}/invocations", request), range(3)))
        for status, body in answers:
            assert status == 200, body
            served.write_bytes(decode(json.loads(body)["predictions"][0][OUTPUT], "a"))
            assert np.array_equal(label_map(served)[0], label_map(written)[0])
    finally:
        os.killpg(serving.pid, 9)
        serving.wait(timeout=30)


def test_the_run_carries_its_datasets_and_evaluation_is_a_run_of_its_own(trained, tiny_phantom, tmp_path):
    server, result, root = trained
    client = mlflow.MlflowClient(server.uri)
    run = client.get_run(result["run_id"])
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    splits = json.loads((root / "run" / "splits.json").read_text())
    train_cases = splits_cases(tiny_phantom, splits["train"])
    assert inputs["training"].digest == cache_key(train_cases) and inputs["training"].source_type == "local"
    profile = json.loads(inputs["training"].profile)
    assert profile["cases"] == len(splits["train"]) == 6 and profile["channels"] == 1
    assert profile["median_shape"] == np.median([nib.load(c["image"]).shape[:3] for c in train_cases], 0).tolist()
    end_before = run.info.end_time

    summary = evaluate(compose("evaluate", [f"ckpt={root / 'run' / 'checkpoints' / 'best.pt'}", "split=val",
                                            f"tracking.uri={server.uri}", "overlays=0", f"output={tmp_path}",
                                            f"paths.run_dir={tmp_path}"]))
    assert client.get_run(result["run_id"]).info.end_time == end_before  # the training run is never reopened
    (evaluation,) = [r for r in client.search_runs([run.info.experiment_id], "tags.evaluation = 'true'")]
    assert evaluation.info.run_id != result["run_id"] and evaluation.info.status == "FINISHED"
    (model,) = client.search_logged_models([run.info.experiment_id],
                                           filter_string=f"source_run_id = '{result['run_id']}'")
    assert evaluation.data.tags["scored_run_id"] == result["run_id"]
    assert evaluation.data.tags["scored_model_id"] == model.model_id
    assert evaluation.data.metrics["val_dice_mean"] == pytest.approx(summary["mean"]["dice"])
    (scored,) = evaluation.inputs.dataset_inputs
    assert scored.tags[0].value == "evaluation" and scored.dataset.name == f"{run.data.params['data.name']}/val"


def test_promote_moves_an_alias_and_registers_an_unregistered_run(trained, tiny_phantom, tmp_path, monkeypatch):
    server, result, root = trained
    client = mlflow.MlflowClient(server.uri)
    # a second run, not registered: promote registers its model as version 2 and points the alias there
    second = train(tiny_config(tiny_phantom, tmp_path / "run", overrides=[
        f"tracking.uri={server.uri}", f"tracking.model_name={NAME}", "tracking.log_model=true"]))
    assert promote(server.uri, second["run_id"], "champion", NAME) == f"models:/{NAME}@champion"
    assert client.get_model_version_by_alias(NAME, "champion").run_id == second["run_id"]
    promote(server.uri, result["run_id"], "champion")  # back to version 1, found by its run
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"
    with pytest.raises(InputError, match="run=0123: no such run"):
        promote(server.uri, "0123", "champion")
    # a version the previous release registered (the checkpoint file itself) still serves ckpt=models:/...@alias
    old = client.create_model_version(NAME, f"runs:/{result['run_id']}/checkpoints/best.pt", run_id=result["run_id"])
    client.set_registered_model_alias(NAME, "legacy", old.version)
    (path,) = checkpoints(f"models:/{NAME}@legacy", cache=tmp_path / "registry")
    assert path.name == "best.pt" and checkpoint.load(path)["run_id"] == result["run_id"]


@pytest.mark.slow  # MLflow's sampler needs seconds of run: `make test-slow`
def test_system_metrics_switch_samples_the_machine_into_the_run(tiny_phantom, tmp_path, mlflow_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    result = train(tiny_config(tiny_phantom, tmp_path, overrides=[
        "tracking.system_metrics=true", "trainer.max_epochs=3", f"tracking.uri={mlflow_store}"]))
    metrics = mlflow.MlflowClient(mlflow_store).get_run(result["run_id"]).data.metrics
    assert metrics["system/cpu_utilization_percentage"] >= 0 and metrics["system/system_memory_usage_megabytes"] > 0


def test_the_ui_opens_on_the_runs_table_and_the_run_page_shows_dice_dataset_and_model(trained):
    """What `make mlflow-ui` shows, rendered by headless Chromium: the experiment in the training view (not MLflow 3's
    GenAI view) listing the run with its dataset; the run's page with its Dice, dataset and model."""
    server, result, root = trained
    run = mlflow.MlflowClient(server.uri).get_run(result["run_id"])
    experiment, dataset = run.info.experiment_id, f"{run.data.params['data.name']}/train"
    table = rendered(f"{server.uri}/#/experiments/{experiment}/runs")
    assert "Training runs" in table and "No traces" not in table
    assert result["run_name"] in table and dataset in table
    page = rendered(f"{server.uri}/#/experiments/{experiment}/runs/{result['run_id']}{TRAINING_VIEW}")
    assert "val_dice_mean" in page and dataset in page and "Logged models" in page


def rendered(url: str) -> str:
    """The page's text once its scripts ran (20 s of virtual time)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", "--window-size=1600,1000"]
    dom = subprocess.run([chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def splits_cases(phantom: Path, ids: list[str]) -> list[dict]:
    return [{"image": str(phantom / "imagesTr" / f"{i}.nii.gz"), "label": str(phantom / "labelsTr" / f"{i}.nii.gz")}
            for i in ids]


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(url: str, payload: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # not listening yet
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        if process.poll() is not None:
            break
        time.sleep(0.5)
    pytest.fail(f"{url} did not come up:\n{log.read_text()[-3000:]}")



def test_a_request_cell_is_checked_before_it_reaches_the_model(tiny_phantom, tmp_path):
    """What the served model refuses, one line each, and what it takes: .nii.gz as well as .nii."""
    from mlflow.exceptions import MlflowException

    image = sorted((tiny_phantom / "imagesTr").iterdir())[0]
    raw = tmp_path / "case.nii"
    nib.save(nib.load(image), raw)
    assert decode(encode(image), "row 0") == image.read_bytes() and decode(encode(raw), "row 0") == raw.read_bytes()
    for cell, fault in (("%%% not base64", "row 3: not base64 text"),
                        (encode_bytes(b"\x1f\x8b" + b"\0" * 40), "row 3: a truncated or corrupt gzip stream"),
                        (encode_bytes(b"\0" * 400), "row 3: not a NIfTI file")):
        with pytest.raises(MlflowException, match=fault) as caught:
            decode(cell, "row 3")
        assert caught.value.get_http_status_code() == 400 and "\n" not in caught.value.message


def test_the_served_model_class_asks_mlflow_for_no_type_hints():
    """MLflow warns, at class creation, of a `predict` without type hints (a warnings filter cannot stop it: MLflow
    resets filters first); the served model opts out of that wrapping, as MLflow's own model classes do."""
    import warnings

    from pipeline.inference.serving import SegmentationModel

    def hinted_warnings(base) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            type("Served", (base,), {"predict": lambda self, context, model_input, params=None: model_input})
        return [str(w.message) for w in caught if "Add type hints" in str(w.message)]

    assert hinted_warnings(mlflow.pyfunc.PythonModel)  # what a plain PythonModel subclass prints
    assert hinted_warnings(SegmentationModel) == []
