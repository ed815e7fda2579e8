"""Sweeps: every run of a Hydra multirun is tagged with the sweep's folder; at the end one table compares them."""

import logging
import shlex
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def sweep_tags() -> dict[str, str]:
    """{"sweep": <sweep folder>, "sweep_job": <job number>} inside a multirun job, else {}: the shared tag that
    groups a sweep's MLflow runs (`tags.sweep = '...'` in the MLflow UI search box)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hydra = HydraConfig.get()
    return {"sweep": str(hydra.sweep.dir), "sweep_job": str(hydra.job.num)}


def summary(uri: str, sweep_dir: str) -> list[dict]:
    """The sweep's runs, best validation Dice first: run name, job, overrides, best val Dice, status."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = [r for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id], f"tags.sweep = '{sweep_dir}'")]
    rows = [{"job": int(r.data.tags.get("sweep_job", -1)), "run": r.info.run_name,
             "overrides": r.data.tags.get("overrides", ""),
             "best_val_dice": r.data.metrics.get("best_val_dice_mean"), "status": r.info.status} for r in runs]
    return sorted(rows, key=lambda r: -(r["best_val_dice"] if r["best_val_dice"] is not None else -1))


class SweepSummary(Callback):
    """Prints the sweep's table when a multirun ends (in the launching process, whatever the launcher)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        uri = config.get("tracking", {}).get("uri")
        if not uri:
            return  # tracking=none: the runs left no record to compare
        try:
            rows = summary(uri, str(config.hydra.sweep.dir))
        except Exception as err:  # a summary must never turn a finished sweep into a failure
            log.warning(f"sweep summary unavailable ({type(err).__name__}: {err})")
            return
        if not rows:
            return
        # Key overrides: those that differ between the jobs (what the sweep swept), not the shared ones.
        tokens = [shlex.split(r["overrides"]) for r in rows]
        shared = set.intersection(*map(set, tokens))
        for r, t in zip(rows, tokens):
            r["overrides"] = " ".join(o for o in t if o not in shared)
        log.info(f"sweep {config.hydra.sweep.dir}: {len(rows)} runs, best validation Dice first")
        log.info(f"{'job':>4}  {'best val Dice':>13}  {'status':9}  {'run':34}  overrides")
        for r in rows:
            dice = f"{r['best_val_dice']:.4f}" if r["best_val_dice"] is not None else "-"
            log.info(f"{r['job']:>4}  {dice:>13}  {r['status']:9}  {r['run']:34}  {r['overrides']}")
