"""Experiment tracking behind a small interface: the engine reports to a Tracker and knows nothing of MLflow."""

import subprocess
from pathlib import Path

from pipeline import project_root


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
        return subprocess.run(["git", *args], cwd=project_root(), capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> str:
    """"true" when tracked files differ from the commit (the run is not reproducible from the commit alone)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return "unknown" if status is None else str(bool(status)).lower()


class NullTracker:
    """Tracks nothing; `tracking=none`."""

    run_id = None

    def start(self, run_name: str, config: dict, tags: dict, run_id: str | None = None) -> None:
        """Nothing to open."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Metrics reach the console through the engine's validation line only."""

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Artifacts stay in the run folder only."""

    def finish(self, status: str = "FINISHED") -> None:
        """Nothing to close."""


class MLflowTracker(NullTracker):
    """One MLflow run per training run: flattened config as params, config.yaml, metrics per epoch, checkpoints."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        import mlflow

        self.mlflow = mlflow
        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location

    def start(self, run_name: str, config: dict, tags: dict, run_id: str | None = None) -> None:
        """A new run, or with run_id the interrupted run continued (its params and config are already logged)."""
        mlflow = self.mlflow
        mlflow.set_tracking_uri(self.uri)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if mlflow.get_experiment_by_name(self.experiment) is None:
            # A local store would otherwise put artifacts in ./mlruns of whatever the cwd is.
            local = self.uri.startswith(("sqlite:", "file:", "/")) and self.artifact_location
            mlflow.create_experiment(self.experiment, artifact_location=Path(self.artifact_location, self.experiment).as_uri() if local else None)
        mlflow.set_experiment(self.experiment)
        if run_id is not None:
            self.run_id = mlflow.start_run(run_id=run_id).info.run_id
            return
        self.run_id = mlflow.start_run(run_name=run_name, tags={"git_commit": git_commit(), **tags}).info.run_id
        mlflow.log_params(flatten(config))
        mlflow.log_dict(config, "config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=folder)

    def finish(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)
