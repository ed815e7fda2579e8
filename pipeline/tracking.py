"""Experiment tracking behind a small interface: the engine reports to a Tracker and knows nothing of MLflow."""

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from pipeline import project_root
from pipeline.errors import InputError
from pipeline.files import StorageError, appending, ensure_writable

log = logging.getLogger(__name__)

# MLflow's HTTP client retries a dead server for minutes by default (7 retries, backoff factor 2, 120 s timeout).
# A tracker gives up on the first failure instead (see MLflowTracker), so one short try is enough; set in `start`,
# unless the environment already says otherwise.
HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: MLflow params are flat strings."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=project_root(), capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> str:
    """"true" when tracked files differ from the commit (the run is not reproducible from the commit alone)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return "unknown" if status is None else str(bool(status)).lower()


class NullTracker:
    """Tracks nothing remotely; `tracking=none`. With `local_dir`, every log_metrics call also lands in metrics.jsonl
    there."""

    run_id = None
    local_dir = None  # class defaults: subclasses (the benchmarks' recorders) need not call __init__

    def __init__(self, local_dir: str | None = None):
        self.local_dir = local_dir

    def start(self, run_name: str, config: dict, tags: dict, run_id: str | None = None) -> None:
        """Nothing to open."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One JSON line per call in <local_dir>/metrics.jsonl; the console gets the engine's validation line."""
        if self.local_dir is None:
            return
        with appending(Path(self.local_dir) / "metrics.jsonl") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}, default=float) + "\n")

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Artifacts stay in the run folder only."""

    def register(self, checkpoint: str | Path) -> str | None:
        """No registry."""
        return None

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """Nothing to close."""


def tracking_errors() -> tuple[type[BaseException], ...]:
    """What a store or server that went away raises: MlflowException (MLflow wraps HTTP and most SQL failures in
    it), SQLAlchemy's own errors (a sqlite file it cannot open), OSError (and a StorageError of ours)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return MlflowException, SQLAlchemyError, OSError, StorageError


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())  # MLflow's messages span lines; a warning is one
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class MLflowTracker(NullTracker):
    """One MLflow run per training run: flattened config as params, config.yaml, metrics per epoch, checkpoints.

    Every call talks to the store through its own MlflowClient (no global MLflow state). A store or server that fails
    never stops training: the first failure prints one warning line and the tracker stops trying; metrics.jsonl and the
    checkpoints in the run folder are the record. With `register`, `register(best.pt)` makes the checkpoint a new
    version of the registered model `model_name` (inference takes `ckpt=models:/<name>/<version>`).
    """

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None, local_dir: str | None = None,
                 register: bool = False, model_name: str | None = None):
        super().__init__(local_dir)
        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self.registers, self.model_name = bool(register), model_name or experiment
        self.client = None
        self.failed = False  # after the first failure nothing more is sent
        self.logged: dict[Path, str] = {}  # local file -> its artifact path in the run

    def _fail(self, what: str, err: BaseException) -> None:

        if not self.failed:
            self.failed = True
            kept = f"; metrics.jsonl and checkpoints stay in {self.local_dir}" if self.local_dir else ""
            log.warning(f"MLflow tracking at {self.uri} failed in {what} ({_one_line(err)}); "
                       f"no more tracking for this run{kept}")

    def _artifact_root(self) -> str | None:
        """Where a new experiment keeps its artifacts: artifact_location, else mlartifacts/ beside a sqlite store (so
        a store and its artifacts stay together, wherever the cwd is; MLflow's default is ./mlruns of the cwd).
        None for a server, which keeps them under its own --artifacts-destination."""
        if not self.uri.startswith(("sqlite:", "file:", "/")):
            return None
        if self.artifact_location:
            root = Path(self.artifact_location)
        elif self.sqlite_file:
            root = self.sqlite_file.parent / "mlartifacts"
        else:
            return None
        return (root.absolute() / self.experiment).as_uri()

    @property
    def sqlite_file(self) -> Path | None:
        """The database file of a local sqlite store (sqlite:///<path>); None for any other store."""
        return Path(self.uri.removeprefix("sqlite:///")) if self.uri.startswith("sqlite:///") else None

    def _live(self) -> bool:
        return self.client is not None and self.run_id is not None and not self.failed

    def start(self, run_name: str, config: dict, tags: dict, run_id: str | None = None) -> None:
        """A new run, or with run_id the interrupted run continued (its params and config are already logged).

        A store that cannot be reached warns once and leaves the tracker off; a run_id the store does not know raises
        (MlflowException RESOURCE_DOES_NOT_EXIST), so the caller can open a new run instead.
        """
        for key, value in HTTP_SETTINGS.items():
            os.environ.setdefault(key, value)
        try:
            self._start(run_name, config, tags, run_id)
        except tracking_errors() as err:
            if run_id is not None and getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                raise
            self.run_id = None
            self._fail("start", err)

    def _start(self, run_name: str, config: dict, tags: dict, run_id: str | None) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        if self.sqlite_file:
            # A file MLflow cannot write would cost a minute of its retries and then a traceback: try it first.
            ensure_writable(self.sqlite_file)
        self.client = client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:
            client.get_run(run_id)  # raises RESOURCE_DOES_NOT_EXIST for a run of another store
            client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(self.experiment, artifact_location=self._artifact_root())
            except tracking_errors()[0] as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another job of a sweep made it first
                    raise
                experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
        else:
            experiment_id = experiment.experiment_id
        all_tags = resolve_tags({"git_commit": git_commit(), **{k: str(v) for k, v in tags.items()},
                                 MLFLOW_RUN_NAME: run_name})
        self.run_id = client.create_run(experiment_id, tags=all_tags, run_name=run_name).info.run_id
        client.log_batch(self.run_id, params=[Param(k, v) for k, v in flatten(config).items()])
        client.log_dict(self.run_id, config, "config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        super().log_metrics(metrics, step)  # on disk first, whatever happens to the store
        if not self._live():
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        except tracking_errors() as err:
            self._fail("log_metrics", err)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if not self._live():
            return
        try:
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder)
            self.logged[Path(path).resolve()] = f"{folder}/{Path(path).name}" if folder else Path(path).name
        except tracking_errors() as err:
            self._fail("log_artifact", err)

    def register(self, checkpoint: str | Path) -> str | None:
        """With `register: true`, the checkpoint (logged under checkpoints/ unless it already is) becomes the next
        version of the registered model `model_name`; returns and prints "models:/<name>/<version>". None when off or
        failed."""
        if not (self.registers and self._live()):
            return None
        checkpoint = Path(checkpoint)
        try:
            if checkpoint.resolve() not in self.logged:
                self.log_artifact(checkpoint, "checkpoints")
                if self.failed:
                    return None
            source = f"runs:/{self.run_id}/{self.logged[checkpoint.resolve()]}"
            # mlflow.register_model wants a logged MLflow model for a runs:/ URI; a plain file needs the client API.
            try:
                self.client.create_registered_model(self.model_name)
            except tracking_errors()[0] as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = self.client.create_model_version(self.model_name, source, run_id=self.run_id,
                                                       await_creation_for=0,
                                                       description=f"{checkpoint.name} of run {self.run_id}")
        except tracking_errors() as err:
            self._fail("register", err)
            return None
        uri = f"models:/{self.model_name}/{version.version}"
        log.info(f"registered {checkpoint} as {uri} (infer with ckpt={uri})")
        return uri

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """End the run as FINISHED, FAILED or KILLED; `reason` (the one line the user saw) becomes the tag
        `stop_reason`."""
        if not self._live():
            return
        try:
            if reason:
                self.client.set_tag(self.run_id, "stop_reason", reason[:5000])  # MLflow's tag value limit
            self.client.set_terminated(self.run_id, status)
        except tracking_errors() as err:
            self._fail("finish", err)


def tracking_uri() -> str:
    """The store conf/tracking/mlflow.yaml names (MLFLOW_TRACKING_URI, else the project's sqlite file), read from
    the config itself so the two never disagree."""
    from pipeline.config import option  # composes a config: only for the registry's models:/ URIs

    return str(option("tracking", "mlflow").uri)


def download_registered(uri: str, cache: str | Path | None = None) -> list[Path]:
    """`models:/<name>/<version>`, `models:/<name>/latest` or `models:/<name>@<alias>` -> the version's checkpoint
    file(s), downloaded from the registry at tracking_uri() into <cache>/<name>/<version> (default outputs/registry)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    store = tracking_uri()
    ref = uri.removeprefix("models:/")
    name, alias = ref.split("@", 1) if "@" in ref else (ref, None)
    if alias is None:
        name, _, number = ref.rpartition("/")
    if not name or not (alias or number):
        raise InputError(f"{uri}: expected models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias>")
    client = mlflow.MlflowClient(tracking_uri=store)
    try:
        if alias is not None:
            version = client.get_model_version_by_alias(name, alias)
        elif number == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise InputError(f"{uri}: registered model {name} has no versions in {store}")
            version = max(versions, key=lambda v: int(v.version))
        else:
            version = client.get_model_version(name, number)
        folder = Path(cache or project_root() / "outputs" / "registry") / name / str(version.version)
        shutil.rmtree(folder, ignore_errors=True)  # a fresh copy: another store may number its versions alike
        folder.mkdir(parents=True)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(folder),
                                                         tracking_uri=store))
    except (MlflowException, OSError) as err:
        raise InputError(f"{uri}: cannot fetch it from the registry at {store} ({_one_line(err, 200)})") from None
    paths = sorted(local.rglob("*.pt")) if local.is_dir() else [local]
    if not paths:
        raise InputError(f"{uri}: version {version.version} ({version.source}) holds no .pt checkpoint")
    return paths
