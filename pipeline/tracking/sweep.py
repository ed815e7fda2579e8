"""Sweeps: a Hydra multirun (grid or Optuna, any launcher) is one MLflow parent run with a nested run per job, each
tagged with the sweep's folder; at the end the parent records the best job and one table compares them."""

import logging
import shlex
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline.tracking.runs import PARENT_FILE, MLflowTracker

log = logging.getLogger(__name__)

def dataset_name(data: DictConfig) -> tuple[str | None, str | None]:
    """(the name each job's completion will give the dataset, None) or (None, the fault): data.name, else the
    "name" of its dataset.json, else its folder's name, as pipeline.data.sources reads it, from dataset.json alone."""
    from pipeline.data.sources import dataset_json, declared_name, detect_layout, ensure_demo_data

    if data.get("name"):
        return str(data.name), None
    if OmegaConf.is_missing(data, "root"):
        return None, "data.root is not set"
    ensure_demo_data(data)  # the demo folder is made here once, not by each job that would find it missing
    root = Path(data.root).expanduser()
    layout = detect_layout(root) if data.get("layout") == "auto" and root.is_dir() else data.get("layout")
    if layout == "folders":
        return root.name, None
    _, meta, problems = dataset_json(root, f"a dataset in {layout} layout", str(layout))
    if not isinstance(meta, dict):
        return None, problems[0] if problems else f"{root / 'dataset.json'}: not a JSON object"
    return declared_name(root, meta), None


def summary(uri: str, sweep_dir: str) -> list[dict]:
    """The sweep's runs, best validation Dice first: run name, job, overrides, best val Dice, status."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = [r for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id], f"tags.sweep = '{sweep_dir}'")]
    rows = [{"job": int(r.data.tags.get("sweep_job", -1)), "run": r.info.run_name, "run_id": r.info.run_id,
             "overrides": r.data.tags.get("overrides", ""),
             "best_val_dice": r.data.metrics.get("best_val_dice_mean"), "status": r.info.status} for r in runs]
    return sorted(rows, key=lambda r: -(r["best_val_dice"] if r["best_val_dice"] is not None else -1))


class SweepRun(Callback):
    """In the launching process: opens the sweep's parent run when the multirun starts; when it ends, records the
    best job in it (tags best_run_id, best_job, best_overrides; metric best_val_dice_mean) and prints the table."""

    def __init__(self) -> None:
        self.parent = None  # the parent run's MLflowTracker

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking = config.get("tracking", {})
        if not tracking.get("uri"):
            return  # tracking=none: no runs to group
        folder = Path(config.hydra.sweep.dir)
        (folder / PARENT_FILE).unlink(missing_ok=True)  # a sweep folder run again (make cv resume=auto): a new parent
        # tracking.experiment is ${data.name}, which each job fills from its dataset: null in this process unless given
        experiment, fault = (tracking.experiment, None) if tracking.experiment else dataset_name(config.data)
        if experiment is None:
            log.warning(f"sweep {folder}: no MLflow parent run ({fault})")
            return
        self.parent = MLflowTracker(tracking.uri, experiment, tracking.get("artifact_location"))
        swept = {"overrides": " ".join(config.hydra.overrides.task),
                 "params": {str(k): str(v) for k, v in (config.hydra.sweeper.get("params") or {}).items()},
                 "sweeper": config.hydra.sweeper.get("_target_", ""), "launcher": config.hydra.launcher.get("_target_")}
        self.parent.start(f"sweep_{folder.name}", {"sweep": swept}, {"sweep_parent": str(folder)})
        if self.parent.run_id:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / PARENT_FILE).write_text(self.parent.run_id)
            log.info(f"sweep {folder}: MLflow parent run {self.parent.run_id}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        uri = config.get("tracking", {}).get("uri")
        if not uri:
            return  # tracking=none: the runs left no record to compare
        try:
            rows = summary(uri, str(config.hydra.sweep.dir))
        except Exception as err:  # a summary must never turn a finished sweep into a failure
            log.warning(f"sweep summary unavailable ({type(err).__name__}: {err})")
            rows = []
        # Key overrides: those that differ between the jobs (what the sweep swept), not the shared ones.
        tokens = [shlex.split(r["overrides"]) for r in rows]
        shared = set.intersection(*map(set, tokens)) if tokens else set()
        for r, t in zip(rows, tokens):
            r["overrides"] = " ".join(o for o in t if o not in shared)
        self.close(rows)
        if not rows:
            return
        log.info(f"sweep {config.hydra.sweep.dir}: {len(rows)} runs, best validation Dice first")
        log.info(f"{'job':>4}  {'best val Dice':>13}  {'status':9}  {'run':34}  overrides")
        for r in rows:
            dice = f"{r['best_val_dice']:.4f}" if r["best_val_dice"] is not None else "-"
            log.info(f"{r['job']:>4}  {dice:>13}  {r['status']:9}  {r['run']:34}  {r['overrides']}")

    def close(self, rows: list[dict]) -> None:
        """The parent run ends FINISHED with its best job (the first row that has a Dice), FAILED with none."""
        if self.parent is None or not self.parent.run_id:
            return
        best = next((r for r in rows if r["best_val_dice"] is not None), None)
        if best is not None and self.parent.client is not None:
            try:
                for key, value in (("best_run_id", best["run_id"]), ("best_job", best["job"]),
                                   ("best_overrides", best["overrides"])):
                    self.parent.client.set_tag(self.parent.run_id, key, str(value))
            except Exception as err:  # as the summary: never a failure of a finished sweep
                log.warning(f"sweep parent run: {type(err).__name__}: {err}")
            self.parent.log_metrics({"best_val_dice_mean": best["best_val_dice"], "jobs": len(rows)}, step=0)
        self.parent.finish("FINISHED" if best is not None else "FAILED",
                           None if best is not None else "no job of the sweep reached a validation")
