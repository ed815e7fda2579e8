"""What happens after a training epoch besides training, as small hooks `engine.fit` calls in order (Lightning's
callbacks, in plain torch). `from_config` turns them on from the trainer config; a new one needs no edit to fit."""

import logging

import nibabel as nib
from omegaconf import DictConfig

from pipeline.core import distributed
from pipeline.core.files import free_bytes, megabytes
from pipeline.data.io import ras_spacing
from pipeline.evaluation import plots
from pipeline.inference.predictor import predict
from pipeline.models import checkpoint
from pipeline.training.engine import Job, TrainState

log = logging.getLogger(__name__)


class Callback:
    def on_fit_start(self, job: Job, state: TrainState) -> None:
        """Before the first epoch (of this process: after a resume, state.epoch is the last one done)."""

    def on_epoch_end(self, job: Job, state: TrainState, metrics: dict) -> None:
        """After the epoch's training, validation (`metrics` holds val_* then), scheduler step and logging."""

    def on_interrupt(self, job: Job, state: TrainState) -> None:
        """A SIGINT/SIGTERM stopped training in the middle of an epoch (state.epoch: the last whole one)."""


class Checkpoints(Callback):
    """best.pt (weights + config: what inference needs) when validation improved; last.pt (everything a resume
    needs: the TrainState, optimizer and scheduler too) every epoch. Written atomically, by rank 0 alone. Warns once
    when the disk cannot hold the next last.pt (the temporary copy is written beside the current one)."""

    def __init__(self):
        self.warned = False

    def on_fit_start(self, job: Job, state: TrainState) -> None:
        # before any save: the weights plus two optimizer moments a parameter (Adam's; SGD keeps one)
        self.warn_if_short(job, 3 * sum(p.numel() * p.element_size() for p in job.model.parameters()))

    def warn_if_short(self, job: Job, need: int) -> None:
        if self.warned or not distributed.is_main() or (free := free_bytes(job.run_dir.checkpoints)) >= need:
            return
        self.warned = True
        log.warning(f"{job.run_dir.checkpoints}: {megabytes(free)} free, less than one last.pt needs "
                    f"({megabytes(need)}); free some space or set hydra.run.dir to another disk")

    def on_epoch_end(self, job: Job, state: TrainState, metrics: dict) -> None:
        common = {"run_id": job.tracker.run_id, "precision": job.precision.record()}
        if state.improved and distributed.is_main():
            checkpoint.save(job.run_dir.best, job.kept, job.config, epoch=state.epoch, metrics=state.best, **common)
        saved = state.state_dict()  # under DDP a collective (every rank's RNG streams): every rank calls it
        if distributed.is_main():
            scheduler = job.scheduler.state_dict() if job.scheduler else None
            if job.ema is not None:  # state_dict is the average (what inference takes); training goes on from these
                saved |= {"raw_state_dict": job.model.state_dict(), "ema_updates": int(job.ema.n_averaged)}
            checkpoint.save(job.run_dir.last, job.kept, job.config, optimizer=job.optimizer.state_dict(),
                            scheduler=scheduler, schedule=job.schedule_config, **common, **saved)
            self.warn_if_short(job, job.run_dir.last.stat().st_size)

    def on_interrupt(self, job: Job, state: TrainState) -> None:
        self.on_epoch_end(job, state, {})  # last.pt only: state.improved is False mid-epoch


class Overlays(Callback):
    """Input, truth and prediction of the first validation case at validation epochs divisible by `every`
    (trainer.overlay_every), to watch a run learn: PNGs in the run's overlays/, logged as artifacts."""

    def __init__(self, every: int):
        self.every, self.spacing = every, None

    def on_epoch_end(self, job: Job, state: TrainState, metrics: dict) -> None:
        if "val_dice_mean" not in metrics or state.epoch % self.every or not distributed.is_main():
            return
        batch = next(iter(job.val_loader))
        if self.spacing is None:  # the grid the network sees: data.spacing, else the first case's own
            self.spacing = (job.config["data"]["spacing"]
                            or ras_spacing(nib.load(job.val_loader.dataset.data[0]["image"]).affine))
        pred = predict(job.kept, batch["image"][:1], job.inferer, job.device, job.precision.dtype)
        path = job.run_dir.overlays / f"epoch{state.epoch:04d}.png"
        plots.overlay(batch["image"][0, 0].numpy(), batch["label"][0, 0].numpy().astype(int),
                      pred.argmax(1)[0].cpu().numpy(), self.spacing, job.class_names, path, title=path.stem)
        job.tracker.log_artifact(path, "overlays")


class EarlyStopping(Callback):
    """Stop after `patience` validations without the val mean Dice rising by more than min_delta (TrainState.stale
    counts them)."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta

    def on_epoch_end(self, job: Job, state: TrainState, metrics: dict) -> None:
        if state.stale >= self.patience and state.stop is None:
            state.stop = (f"early stopping after epoch {state.epoch}: val Dice has not risen by more than "
                          f"{self.min_delta} for {state.stale} validations "
                          f"(best {state.best['val_dice_mean']:.4f} at epoch {state.best['epoch']})")


def from_config(trainer: DictConfig) -> list[Callback]:
    """Checkpoints always; overlays with trainer.overlay_every > 0; early stopping with
    trainer.early_stopping.patience."""
    stop = trainer.get("early_stopping") or {}
    return [
        *([Overlays(trainer.overlay_every)] if trainer.get("overlay_every") else []),
        Checkpoints(),
        *([EarlyStopping(stop["patience"], stop.get("min_delta", 0.0))] if stop.get("patience") else []),
    ]


