"""Experiment tracking behind a small interface: the engine reports to a Tracker and knows nothing of MLflow."""

import contextlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from pipeline import project_root
from pipeline.core.errors import InputError, first_line
from pipeline.core.files import StorageError, appending, ensure_writable

log = logging.getLogger(__name__)

# (checkpoint, run id, tracking URI) -> the logged MLflow model's id: inference/serving.py's log_model
ModelWriter = Callable[[str | Path, str, str], str]

# The experiment tag that picks MLflow 3's UI view: its model-training view (runs table, metrics, models), not GenAI's.
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
TRAINING_VIEW = "?workflowType=machine_learning"  # the same view for a link straight to a run's page

# MLflow's HTTP client retries a dead server for minutes by default (7 retries, backoff factor 2, 120 s timeout).
# A tracker gives up on the first failure instead (see MLflowTracker), so one short try is enough; set in `start`,
# unless the environment already says otherwise.
HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


# The parent run's id, in this file of the sweep folder: every job reads it, whichever launcher runs it (in this
# process, joblib's workers, SLURM through submitit) as long as the folder is shared
PARENT_FILE = "mlflow_parent_run_id"


def sweep_tags() -> dict[str, str]:
    """{"sweep": <sweep folder>, "sweep_job": <job number>} inside a multirun job, else {}: the shared tag that
    groups a sweep's MLflow runs (`tags.sweep = '...'` in the MLflow UI search box)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hydra = HydraConfig.get()
    return {"sweep": str(hydra.sweep.dir), "sweep_job": str(hydra.job.num)}


def sweep_parent() -> str | None:
    """Inside a multirun job: its sweep's parent run id (None outside a sweep, or where no parent was opened)."""
    path = Path(tags["sweep"]) / PARENT_FILE if (tags := sweep_tags()) else None
    return path.read_text().strip() if path is not None and path.is_file() else None


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

    def log_datasets(self, datasets: dict[str, "VolumeDataset"]) -> None:
        """No dataset inputs."""

    def log_model(self, checkpoint: str | Path, writer: ModelWriter) -> str | None:
        """No model store."""
        return None

    def register(self, checkpoint: str | Path) -> str | None:
        """No registry."""
        return None

    def link(self, run_id: str | None) -> None:
        """An evaluation's scored run: nothing to link."""

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """Nothing to close."""


@dataclass
class Ending:
    """How a tracked run ended: set by the block inside `finishing` where it knows better (a stop is KILLED)."""
    status: str | None = None
    reason: str | None = None


@contextlib.contextmanager
def finishing(tracker: NullTracker, last_good: Callable[[], Path | None]) -> Iterator[Ending]:
    """The run's end status kept in one place (as lightning-hydra-template's task_wrapper): FINISHED when the block
    ends, FAILED with the error's first line when it raises, unless the block said otherwise on the Ending it gets; a
    storage error also names the last good checkpoint (`last_good()`), in the run and in the error raised."""
    end = Ending()
    try:
        yield end
        end.status = end.status or "FINISHED"
    except StorageError as err:  # the disk, not the run: say which checkpoint survived it
        end.status, end.reason = "FAILED", f"{err}; last good checkpoint: {last_good() or 'none yet'}"
        raise StorageError(end.reason) from err
    except BaseException as err:
        end.status, end.reason = end.status or "FAILED", end.reason or first_line(err)
        raise
    finally:
        tracker.finish(end.status, end.reason)


def tracking_errors() -> tuple[type[BaseException], ...]:
    """What a store or server that went away raises: MlflowException (MLflow wraps HTTP and most SQL failures in
    it), SQLAlchemy's own errors (a sqlite file it cannot open), OSError (and a StorageError of ours)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return MlflowException, SQLAlchemyError, OSError, StorageError


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())  # MLflow's messages span lines; a warning is one
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class VolumeDataset:
    """What a run saw of its data, as an MLflow dataset input: the data root as source, the file list's fingerprint
    as digest, and a profile (cases, channels, classes, median shape and spacing). Volumes are not tabular: MLflow's
    metadata-only kind (MetaDataset), with the profile added."""

    def __init__(self, name: str, root: str | Path, digest: str, profile: dict):
        self.name, self.root, self.digest, self.profile = name, str(root), digest, profile

    def entity(self):
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        profile = self.profile

        class Profiled(MetaDataset):
            def to_dict(self) -> dict[str, str]:
                return super().to_dict() | {"profile": json.dumps(profile)}

        return Profiled(resolve_dataset_source(self.root), name=self.name, digest=self.digest)._to_mlflow_entity()


class MLflowTracker(NullTracker):
    """One MLflow run per training run: flattened config as params, config.yaml, its datasets, metrics per epoch,
    checkpoints, and the model (a pyfunc LoggedModel that `mlflow models serve` serves; pipeline/inference/serving.py).

    Every call talks to the store through its own MlflowClient (no global MLflow state). A store or server that fails
    never stops training: the first failure prints one warning line and the tracker stops trying; metrics.jsonl and the
    checkpoints in the run folder are the record. With `register`, `register(best.pt)` makes the logged model a new
    version of the registered model `model_name`, and `alias` (e.g. champion) moves to it (inference takes
    `ckpt=models:/<name>@<alias>`). With `system_metrics`, MLflow samples CPU, memory, disk and GPU as system/*.
    """

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None, local_dir: str | None = None,
                 register: bool = False, model_name: str | None = None, alias: str | None = None,
                 log_model: bool = True, system_metrics: bool = False):
        super().__init__(local_dir)
        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self.registers, self.model_name, self.alias = bool(register), model_name or experiment, alias
        self.logs_model, self.system_metrics = bool(log_model), bool(system_metrics)
        self.client = None
        self.monitor = None  # MLflow's SystemMetricsMonitor, with system_metrics
        self.failed = False  # after the first failure nothing more is sent
        self.logged: dict[Path, str] = {}  # local file -> its artifact path in the run
        self.model_id: str | None = None  # the LoggedModel this run made (training) or scored (evaluation)

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
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        if self.sqlite_file:
            # A file MLflow cannot write would cost a minute of its retries and then a traceback: try it first.
            ensure_writable(self.sqlite_file)
        self.client = client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:
            client.get_run(run_id)  # raises RESOURCE_DOES_NOT_EXIST for a run of another store
            client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self.watch(resume=True)
            return
        parent = {MLFLOW_PARENT_RUN_ID: p} if (p := sweep_parent()) else {}  # a multirun job: nested in its sweep
        all_tags = resolve_tags({"git_commit": git_commit(), **{k: str(v) for k, v in tags.items()},
                                 MLFLOW_RUN_NAME: run_name, **parent})
        self.run_id = client.create_run(self.experiment_id(), tags=all_tags, run_name=run_name).info.run_id
        client.log_batch(self.run_id, params=[Param(k, v) for k, v in flatten(config).items()])
        client.log_dict(self.run_id, config, "config.yaml")
        self.watch(resume=False)

    def experiment_id(self) -> str:
        """The experiment's id, made if new, shown in the UI's model-training view (MLflow 3 opens a new experiment
        in its GenAI view, where training runs are a toggle away)."""
        client, experiment = self.client, self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(self.experiment, artifact_location=self._artifact_root(),
                                                         tags={EXPERIMENT_KIND: TRAINING_KIND})
            except tracking_errors()[0] as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another job of a sweep made it first
                    raise
                experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
        else:
            experiment_id = experiment.experiment_id
            if EXPERIMENT_KIND not in experiment.tags:  # one made by an earlier release
                client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, TRAINING_KIND)
        return experiment_id

    def watch(self, resume: bool) -> None:
        """With system_metrics: MLflow's monitor samples the machine into this run (system/cpu_utilization_percentage,
        system/system_memory_usage_megabytes, system/gpu_*, ...) every 10 s until finish."""
        if self.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri)
            self.monitor.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        super().log_metrics(metrics, step)  # on disk first, whatever happens to the store
        if not self._live():
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step, model_id=self.model_id)
                                                        for k, v in metrics.items()])
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

    def log_datasets(self, datasets: dict[str, VolumeDataset]) -> None:
        """Each dataset as an input of the run under its context (training, validation, evaluation): the runs table's
        Dataset column."""
        if not self._live():
            return
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        try:
            self.client.log_inputs(self.run_id, datasets=[
                DatasetInput(d.entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
                for context, d in datasets.items()])
        except tracking_errors() as err:
            self._fail("log_datasets", err)

    def log_model(self, checkpoint: str | Path, writer: ModelWriter) -> str | None:
        """The checkpoint as this run's MLflow model, written by `writer` (inference/serving.py's log_model, handed in
        by the training run: tracking sits below inference): its model id, also kept as model_id. None when off
        (tracking.log_model=false) or failed."""
        if not (self.logs_model and self._live()):
            return None
        try:
            self.model_id = writer(checkpoint, self.run_id, self.uri)
        except tracking_errors() as err:
            self._fail("log_model", err)
            return None
        log.info(f"logged {Path(checkpoint).name} as the MLflow model models:/{self.model_id} (mlflow.pyfunc)")
        return self.model_id

    def register(self, checkpoint: str | Path) -> str | None:
        """With `register: true`, this run's MLflow model (log_model first) becomes the next version of the registered
        model `model_name`, and `alias` moves to it; returns and prints "models:/<name>/<version>". None when off or
        failed."""
        if not (self.registers and self._live()):
            return None
        if self.model_id is None:  # training logs it first: off, or its logging failed
            if not (self.failed or self.logs_model):
                log.warning("tracking.register=true needs the run's MLflow model: set tracking.log_model=true")
            return None
        try:
            with using_store(self.uri):  # the registry looks the model's source up in MLflow's global store
                uri = register_version(self.client, self.model_name, self.model_id, self.run_id, self.alias)
        except tracking_errors() as err:
            self._fail("register", err)
            return None
        log.info(f"registered {Path(checkpoint).name} as {uri}"
                 f"{f' (@{self.alias})' if self.alias else ''}; infer with ckpt={uri}")
        return uri

    def link(self, run_id: str | None) -> None:
        """An evaluation run's link to what it scored: the training run's id and its MLflow model's as tags; the
        metrics then land on that model too (its page in the UI lists them)."""
        if run_id is None or not self._live():
            return
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_tag(self.run_id, "scored_run_id", run_id)
            try:
                experiment = self.client.get_run(run_id).info.experiment_id
            except MlflowException:  # trained against another store: the tag still says which run
                log.warning(f"the scored run {run_id} is not in {self.uri}: its model is not linked")
                return
            models = self.client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
            if models:
                self.model_id = models[0].model_id
                self.client.set_tag(self.run_id, "scored_model_id", self.model_id)
        except tracking_errors() as err:
            self._fail("link", err)

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """End the run as FINISHED, FAILED or KILLED; `reason` (the one line the user saw) becomes the tag
        `stop_reason`."""
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None
        if not self._live():
            return
        try:
            if reason:
                self.client.set_tag(self.run_id, "stop_reason", reason[:5000])  # MLflow's tag value limit
            self.client.set_terminated(self.run_id, status)
        except tracking_errors() as err:
            self._fail("finish", err)


def register_version(client, name: str, model_id: str, run_id: str | None, alias: str | None = None) -> str:
    """The MLflow model `model_id` as the next version of registered model `name` (made if new), `alias` moved to
    it: its models:/<name>/<version>."""
    try:
        client.create_registered_model(name)
    except tracking_errors()[0] as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, f"models:/{model_id}", run_id=run_id, model_id=model_id,
                                          await_creation_for=0)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}/{version.version}"


@contextlib.contextmanager
def using_store(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to `uri` for the calls that read no other (Model.log, a LoggedModel's
    download), then put back as it was, the environment variable included (MLflow's own `_use_tracking_uri` unsets
    MLFLOW_TRACKING_URI on the way out)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    before, variable = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    try:
        mlflow.set_tracking_uri(uri)
        yield
    finally:
        mlflow.set_tracking_uri(before)  # which sets or unsets the variable to match: put it back as it was
        if variable is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = variable


def tracking_uri() -> str:
    """The store conf/tracking/mlflow.yaml names (MLFLOW_TRACKING_URI, else the project's sqlite file), read from
    the config itself so the two never disagree."""
    from pipeline.core.config import option  # composes a config: only for the registry's models:/ URIs

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
        with using_store(store):  # a version's models:/<model id> source is looked up in the global store
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(folder),
                                                             tracking_uri=store))
    except (MlflowException, OSError) as err:
        raise InputError(f"{uri}: cannot fetch it from the registry at {store} ({_one_line(err, 200)})") from None
    paths = sorted(local.rglob("*.pt")) if local.is_dir() else [local]
    if not paths:
        raise InputError(f"{uri}: version {version.version} ({version.source}) holds no .pt checkpoint")
    return paths
