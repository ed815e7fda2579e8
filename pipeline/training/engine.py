"""The training and validation loop: plain torch, readable top to bottom. It reports to a Tracker, never to MLflow.

`fit` runs epochs of: train steps -> (budget) -> validate -> decide (best, stale, schedule) -> callbacks (checkpoints,
overlays, early stopping; training/callbacks.py). Where a run stands lives in one TrainState, which last.pt saves and
resume restores.
"""

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from monai.losses import DeepSupervisionLoss
from omegaconf import DictConfig
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from pipeline.core import distributed
from pipeline.core.errors import RunStopped
from pipeline.core.hardware import Precision, autocast, channels_last
from pipeline.core.rundir import RunDir
from pipeline.data.sources import case_id
from pipeline.evaluation.metrics import SegmentationScores
from pipeline.inference.predictor import predict
from pipeline.models import checkpoint
from pipeline.models.adapters import centre_crop, training_outputs

log = logging.getLogger(__name__)


def validate(model, loader, inferer, scores: SegmentationScores, device, dtype) -> dict[str, float]:
    """Scores over the loader's volumes; under DDP over every rank's volumes (each rank scores its own share)."""
    for batch in loader:
        logits = predict(model, batch["image"], inferer, device, dtype)
        scores.update(logits.argmax(1, keepdim=True), batch["label"].to(device))
    if not distributed.debugging():
        return scores.compute(reduce=distributed.all_reduce)
    volumes = {k: v.tolist() for k, v in scores.per_volume().items()}  # read before compute() clears them
    metrics = scores.compute(reduce=distributed.all_reduce)
    distributed.debug("validation", cases=[case_id(c) for c in loader.dataset.data], volumes=volumes, metrics=metrics)
    return metrics


def batch_loss(model, batch: dict, loss_fn, device, dtype) -> torch.Tensor:
    """One batch's training loss, in fp32 (softmax/log of bf16 logits loses precision); an unpadded network's
    smaller output is scored against the centre of the label."""
    image, label = batch["image"].to(device), batch["label"].to(device)
    with autocast(device, dtype):
        out = training_outputs(model(image), label)
    main = out[0] if isinstance(out, list) else out
    return loss_fn(out, centre_crop(label, main.shape[2:]))


@dataclass(kw_only=True)
class Job:
    """Everything a training run is made of, built from the config (train.setup); fit reads it and replaces the
    scheduler when a time budget changes the run's length."""

    model: torch.nn.Module
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    schedule: Callable[[int], object] | None  # epochs -> the config's scheduler for a run that long
    inferer: Callable
    device: torch.device
    precision: Precision
    class_names: list[str]
    splits: dict[str, list[dict]] = field(default_factory=dict)
    fingerprint: Callable[[], dict] | None = None  # the training cases' (completion's): plans.json records it
    train_loader: object = None
    val_loader: object = None
    tracker: object = None
    run_dir: RunDir | None = None
    config: dict = field(default_factory=dict)  # the resolved config, saved in every checkpoint
    # the scheduler node as composed, its length still ${trainer.max_epochs}: last.pt keeps it so that a resumed run
    # (whose config is the resolved one, the length frozen at max_epochs) can still refit its schedule to a budget
    schedule_config: dict | None = None
    interrupts: object = None  # interrupts.Interrupts: a SIGINT/SIGTERM stops training at the next step boundary
    ema: AveragedModel | None = None  # trainer.ema: the moving average of the weights, updated after every step

    @property
    def kept(self) -> torch.nn.Module:
        """The weights validation scores and checkpoints keep: the moving average with trainer.ema, else the model."""
        return self.ema.module if self.ema is not None else self.model


@dataclass
class TrainState:
    """Where a run stands. `state_dict()` is what last.pt holds beside the weights, optimizer and scheduler, and what
    a resume restores; the keys are those of every last.pt written so far."""

    end: int  # the last epoch: trainer.max_epochs, or as many as fit the time budget
    scaler: torch.amp.GradScaler
    augment: Callable | None = None  # the training transforms: their random streams are saved too
    epoch: int = 0
    best: dict = field(default_factory=lambda: {"val_dice_mean": -math.inf, "epoch": 0})
    stale: int = 0  # validations since the best one (early stopping)
    history: list[dict] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)  # each whole epoch's training
    train_seconds: float = 0.0  # training only, validation excluded
    run_seconds: float = 0.0  # the whole epochs so far: training, validation, checkpoints (what a budget counts)
    val_seconds: list[float] = field(default_factory=list)  # each validation's
    overhead_seconds: float = 0.0  # the rest of the epochs: checkpoints, logging
    step_losses: list[float] = field(default_factory=list)  # this process's, not saved
    scheduled: int = 0  # the run length the learning-rate scheduler was built for (end, after every epoch)
    steps: int = 0  # batches trained in this process, over its epochs (the step an interrupt or a NaN names)
    interrupted: int | None = None  # the signal that stopped the run in the middle of an epoch
    improved: bool = False  # this epoch's validation beat the best
    stop: str | None = None  # why the run ends after this epoch

    def state_dict(self) -> dict:
        """Plain data (weights_only=True loads it). Under DDP a collective: every rank's RNG streams are gathered."""
        return {"epoch": self.epoch, "metrics": self.best, "stale": self.stale, "history": self.history,
                "train_minutes": self.train_seconds / 60, "epoch_seconds": self.epoch_seconds, "end_epoch": self.end,
                "run_minutes": self.run_seconds / 60, "val_seconds": self.val_seconds,
                "overhead_seconds": self.overhead_seconds,
                "scaler": self.scaler.state_dict(), "rng": distributed.rng_states(checkpoint.rng_state(self.augment))}

    def load_state_dict(self, saved: dict) -> None:
        self.epoch, self.best, self.train_seconds = saved["epoch"], saved["metrics"], 60 * saved["train_minutes"]
        self.history, self.stale = saved.get("history", []), saved.get("stale", 0)
        self.epoch_seconds, self.end = saved.get("epoch_seconds", []), saved.get("end_epoch", self.end)
        # a last.pt from before budgets counted validation: its training time stands for the run's
        self.run_seconds = 60 * saved.get("run_minutes", saved["train_minutes"])
        self.val_seconds, self.overhead_seconds = saved.get("val_seconds", []), saved.get("overhead_seconds", 0.0)
        self.scheduled = self.end
        self.scaler.load_state_dict(saved["scaler"])
        if (rng := distributed.own_rng(saved["rng"])) is not None:
            checkpoint.restore_rng(rng, self.augment)

    def record(self, metrics: dict, min_delta: float = 0.0) -> None:
        """A validation's metrics: the best so far and the count of validations without a rise above min_delta."""
        self.stale = 0 if metrics["val_dice_mean"] > self.best["val_dice_mean"] + min_delta else self.stale + 1
        self.improved = metrics["val_dice_mean"] > self.best["val_dice_mean"]
        if self.improved:
            self.best = {k: v for k, v in metrics.items() if k.startswith("val_")} | {"epoch": self.epoch}

    def result(self) -> dict:
        return {"best": self.best, "step_losses": self.step_losses, "history": self.history, "epochs": self.epoch,
                "train_minutes": self.train_seconds / 60, "interrupted": self.interrupted, "steps": self.steps}


def fitted_to_budget(trainer: DictConfig) -> bool:
    return trainer.get("max_minutes") is not None and trainer.get("fit_to_budget", True)


# trainer.val_every=auto: validate so that whole-volume validations take at most this share of the training time
# (a watch: the final model is last.pt, and make cv scores each fold's last); the first epoch's validation times one
VAL_SHARE = 0.05


def val_every(trainer: DictConfig, epoch_seconds: Sequence[float], val_seconds: Sequence[float]) -> int:
    """trainer.val_every, or for `auto` the cadence whose validations cost VAL_SHARE of the training time at the
    measured epoch and validation times (1 until a validation is timed)."""
    if trainer.get("val_every") != "auto":
        return trainer.get("val_every") or 1
    if not epoch_seconds or not val_seconds:
        return 1
    epoch = sum(measured := epoch_seconds[1:] or epoch_seconds) / len(measured)
    return max(1, math.ceil(sum(val_seconds) / len(val_seconds) / (VAL_SHARE * epoch)))


def validations(first: int, end: int, every: int) -> int:
    """How many of the epochs first..end validate: every `every`-th, and the last."""
    return end // every - (first - 1) // every + (end % every != 0)


def budgeted_epochs(trainer: DictConfig, epoch: int, spent: float, epoch_seconds: list[float],
                    val_seconds: Sequence[float] = (), overhead: float = 0.0) -> int | None:
    """The last epoch that, with its final validation and checkpoint, ends within trainer.max_minutes on this
    machine (None without a budget), capped by trainer.max_epochs; `epoch` itself when none more fits.

    spent: the run's seconds so far, this epoch's training included; epoch_seconds: each epoch's training (the first,
    which pays one-off costs such as compilation, left out once others are measured); val_seconds: each validation's
    (every trainer.val_every epochs and after the last; the first epoch's validation times one before any other
    is planned); overhead: the seconds of
    checkpoints and logging so far, spread over the epochs."""
    if not fitted_to_budget(trainer) or not epoch_seconds:
        return None
    measured = epoch_seconds[1:] or epoch_seconds
    per_epoch = sum(measured) / len(measured) + overhead / len(epoch_seconds)
    val = sum(val_seconds) / len(val_seconds) if val_seconds else 0.0
    every, left = val_every(trainer, epoch_seconds, val_seconds), 60 * trainer.max_minutes - spent

    def cost(end: int) -> float:  # the rest of this epoch and the ones up to `end`, with their validations
        return (end - epoch) * per_epoch + val * validations(epoch, end, every)

    end = epoch
    while end < trainer.max_epochs and cost(end + 1) <= left:
        end += 1
    return end


def reschedule(schedule, optimizer, epochs: int, done: int):
    """schedule(epochs) rebuilt for a new run length and advanced past the `done` epochs already trained (the
    learning rate jumps to where the new schedule has it). Cosine and poly compute each rate from the previous
    one, so every group restarts from its initial rate before the advance."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"])
    scheduler = schedule(epochs)
    for _ in range(done):
        scheduler.step()
    return scheduler


def prepare(trainer: DictConfig, job: Job, resume: dict | None) -> tuple[torch.nn.Module, TrainState]:
    """The model on its device, the state restored from `resume` (a loaded last.pt) if given, and the module the
    training steps run through (compiled with trainer.compile; under DDP the wrapper that averages gradients)."""
    job.model.to(job.device)
    if trainer.get("channels_last"):  # before any state is loaded: load_state_dict keeps the parameters' format
        channels_last(job.model)
    if trainer.get("ema") is not None:
        # torch's AveragedModel: a copy whose first update copies the weights, then lerps toward them by 1 - decay;
        # buffers too (BatchNorm statistics), so the average validates as it is
        job.ema = AveragedModel(job.model, multi_avg_fn=get_ema_multi_avg_fn(trainer.ema), use_buffers=True)
    scaler = torch.amp.GradScaler(job.device.type, enabled=job.precision.dtype == torch.float16)  # bf16: no scaling
    state = TrainState(end=trainer.max_epochs, scheduled=trainer.max_epochs, scaler=scaler,
                       augment=job.train_loader.dataset.transform)
    if resume is not None:  # weights, optimizer moments, LR, every RNG stream: as last.pt left them
        if job.ema is None:
            job.model.load_state_dict(resume["state_dict"])
        else:  # the config is last.pt's own, so it holds the average (state_dict) and the weights training goes on from
            job.model.load_state_dict(resume["raw_state_dict"])
            job.ema.module.load_state_dict(resume["state_dict"])
            job.ema.n_averaged.fill_(resume["ema_updates"])
        job.optimizer.load_state_dict(resume["optimizer"])
        if job.scheduler is not None:
            job.scheduler.load_state_dict(resume["scheduler"])
        state.load_state_dict(resume)
        if not fitted_to_budget(trainer):  # the saved length was fitted to a budget; without one, max_epochs decides
            state.end = trainer.max_epochs
    if job.schedule is not None and state.scheduled != state.end and not isinstance(job.scheduler, ReduceLROnPlateau):
        job.scheduler, state.scheduled = reschedule(job.schedule, job.optimizer, state.end, state.epoch), state.end
    # trainer.compile compiles the training step only: validation's whole volumes differ in shape and would recompile.
    stepper = torch.compile(job.model) if trainer.get("compile") else job.model
    find_unused = (trainer.get("ddp") or {}).get("find_unused_parameters", False)
    return distributed.wrap(stepper, job.device, find_unused=find_unused), state


def train_epoch(net, job: Job, loss_fn, trainer: DictConfig, state: TrainState) -> dict:
    """One pass over the training cases, stepping the optimizer every trainer.accumulate batches: the epoch's mean
    loss (over every rank's steps) and learning rate. Its time goes into `state`."""
    net.train()
    start, losses, accumulate = time.perf_counter(), [], trainer.get("accumulate") or 1
    job.optimizer.zero_grad(set_to_none=True)
    # `with`: the bar is closed even when a step raises (an open bar would garble later lines)
    with tqdm(job.train_loader, desc=f"epoch {state.epoch}", unit="step", leave=False,
              disable=not distributed.is_main()) as steps:
        for i, batch in enumerate(steps, start=1):
            stepping = i % accumulate == 0 or i == len(job.train_loader)
            with distributed.local_gradients(net, not stepping):
                loss = batch_loss(net, batch, loss_fn, job.device, job.precision.dtype)
                if not torch.isfinite(loss):
                    last = (job.run_dir and job.run_dir.last_good()) or "none yet"
                    raise RunStopped(f"epoch {state.epoch} step {i}: the training loss is {loss.item()}; last good "
                                     f"checkpoint: {last}; lower optimizer.lr, set trainer.grad_clip (e.g. 1.0) "
                                     "or trainer.amp=false")
                # Gradients of `accumulate` batches add up before one step: the mean over a k-times larger batch.
                state.scaler.scale(loss / accumulate).backward()
            if stepping:
                if trainer.grad_clip:
                    state.scaler.unscale_(job.optimizer)
                    torch.nn.utils.clip_grad_norm_(job.model.parameters(), trainer.grad_clip)
                state.scaler.step(job.optimizer)
                state.scaler.update()
                job.optimizer.zero_grad(set_to_none=True)
                if job.ema is not None:
                    job.ema.update_parameters(job.model)
            losses.append(loss.item())
            state.steps += 1
            if requested := stopping(job):  # a SIGINT/SIGTERM arrived: this epoch stays unfinished
                state.interrupted = requested
                break
    state.step_losses += losses
    # the slowest rank's time: every rank takes the same budget decisions; an unfinished epoch is no epoch time
    seconds = distributed.maximum(time.perf_counter() - start)
    state.epoch_seconds += [] if state.interrupted else [seconds]
    state.train_seconds += seconds
    return {"train_loss": distributed.mean(sum(losses), len(losses)), "lr": job.optimizer.param_groups[0]["lr"],
            "train_minutes": state.train_seconds / 60}


def stopping(job: Job) -> int | None:
    """The signal that asks the run to stop (under DDP any rank's, so all ranks stop at the same step), or None."""
    if job.interrupts is None:  # nothing listens (benchmarks, notebooks): no collective on every step
        return None
    requested = job.interrupts.signal
    if distributed.active():
        return int(distributed.maximum(float(requested or 0))) or None
    return requested


def keep_to_budget(trainer: DictConfig, state: TrainState) -> dict:
    """With trainer.max_minutes: the run's end re-estimated from the epoch and validation times so far
    ({"planned_epochs": end}), or, with fit_to_budget=false, a stop once the minutes are spent."""
    if trainer.get("budget_counts", "run") == "run":  # the whole epochs before, and this one's training
        spent, val, overhead = state.run_seconds + state.epoch_seconds[-1], state.val_seconds, state.overhead_seconds
    else:  # "training": validations that measure the run (a benchmark's) do not shorten it
        spent, val, overhead = state.train_seconds, [], 0.0
    fitted = budgeted_epochs(trainer, state.epoch, spent, state.epoch_seconds, val, overhead)
    if fitted is not None:
        # the first estimate without one-off costs, and the first with a validation's time
        if distributed.is_main() and (len(state.epoch_seconds) == 2 or (len(state.val_seconds) == 1 and
                                                                         state.history[-1].get("val_dice_mean"))):
            timed = f", validation {state.val_seconds[0]:.0f} s" if val else ""
            log.info(f"trainer.max_minutes={trainer.max_minutes}: {fitted} epochs fit "
                     f"({state.epoch_seconds[-1]:.1f} s each{timed}); the learning-rate schedule ends there")
        state.end = fitted
        return {"planned_epochs": fitted}
    if trainer.get("max_minutes") is not None and spent >= 60 * trainer.max_minutes:
        state.stop = (f"stopping after epoch {state.epoch}: "
                      f"trainer.max_minutes={trainer.max_minutes} of training reached")
    return {}


def validating(trainer: DictConfig, state: TrainState) -> bool:
    """Every trainer.val_every epochs (`auto`: planned from the measured costs), at the last, at the first epoch end
    past each of trainer.val_minutes, and with a time budget or `auto` at the first epoch: until one is timed the
    budget cannot reserve the final validation (on whole brains or tumours a large share of a short budget), and
    would end the run late by one."""
    now, last = state.train_seconds, state.epoch_seconds[-1]
    passed = any(now - last < 60 * m <= now for m in trainer.get("val_minutes") or [])
    untimed = not state.val_seconds and (trainer.get("val_every") == "auto" or (
        fitted_to_budget(trainer) and trainer.get("budget_counts", "run") == "run"))
    every = val_every(trainer, state.epoch_seconds, state.val_seconds)
    return state.epoch % every == 0 or state.epoch >= state.end or state.stop is not None or passed or untimed


def step_scheduler(job: Job, state: TrainState, metrics: dict) -> None:
    """A plateau scheduler steps on the validation Dice; the others once an epoch, rebuilt when the run's length
    changed (a time budget re-estimated)."""
    if isinstance(job.scheduler, ReduceLROnPlateau):
        if "val_dice_mean" in metrics:
            job.scheduler.step(metrics["val_dice_mean"])
    elif job.scheduler is not None:
        job.scheduler.step()
        if job.schedule is not None and state.scheduled != state.end and state.epoch < state.end:
            job.scheduler, state.scheduled = reschedule(job.schedule, job.optimizer, state.end, state.epoch), state.end


def validation(job: Job, state: TrainState, train_loss: float, min_delta: float) -> dict:
    """Validate the kept weights (and with EMA the last step's as raw_val_*), print the line, record it in the state."""
    began = time.perf_counter()
    scores = SegmentationScores(job.class_names)
    metrics = validate(job.kept, job.val_loader, job.inferer, scores, job.device, job.precision.dtype)
    if job.ema is not None:  # the last step's weights too, as raw_val_*: what the average adds
        raw = validate(job.model, job.val_loader, job.inferer, scores, job.device, job.precision.dtype)
        metrics |= {f"raw_{k}": v for k, v in raw.items()}
    per_class = ", ".join(f"{n} {metrics[f'val_dice_{n}']:.3f}" for n in job.class_names[1:])
    log.info(f"epoch {state.epoch:3d}  loss {train_loss:.4f}  "
             f"val dice {metrics['val_dice_mean']:.3f} ({per_class})  iou {metrics['val_iou_mean']:.3f}")
    state.record(metrics, min_delta)
    state.val_seconds.append(distributed.maximum(time.perf_counter() - began))
    return metrics


def end_epoch(job: Job, state: TrainState, metrics: dict, start: float, callbacks: Sequence) -> None:
    """Log the epoch, run the callbacks (checkpoints: last.pt saves the state as it stands), and count the time that
    was neither training nor validation as overhead, which the budget reserves."""
    metrics["epoch_time"] = time.perf_counter() - start
    job.tracker.log_metrics(metrics, step=state.epoch)
    state.history.append({"epoch": state.epoch} | metrics)
    distributed.debug("epoch", epoch=state.epoch, log=metrics)
    callbacks_start = time.perf_counter()
    took = distributed.maximum(callbacks_start - start)
    validated = state.val_seconds[-1] if "val_dice_mean" in metrics else 0.0
    state.overhead_seconds += took - state.epoch_seconds[-1] - validated
    state.run_seconds += took
    for callback in callbacks:
        callback.on_epoch_end(job, state, metrics)
    saving = distributed.maximum(time.perf_counter() - callbacks_start)
    state.overhead_seconds, state.run_seconds = state.overhead_seconds + saving, state.run_seconds + saving


def fit(trainer: DictConfig, job: Job, callbacks: Sequence = (), resume: dict | None = None) -> dict:
    """Train until epoch state.end (trainer.max_epochs, or fitted to trainer.max_minutes of training on this machine)
    or a callback stops the run; validate every trainer.val_every epochs and after the last. `callbacks`
    (training/callbacks.py) act after every epoch: checkpoints, overlays, early stopping. `resume`: a loaded last.pt.

    Under DDP (trainer=ddp) every rank runs this on its own share of the cases: gradients, the training loss and the
    validation scores are averaged over ranks, so every rank takes the same decisions; rank 0 alone writes files.
    """
    net, state = prepare(trainer, job, resume)
    # Several outputs (deep supervision): MONAI weighs their losses 1, 1/2, 1/4, ... against a resized label.
    loss_fn = DeepSupervisionLoss(job.loss_fn, weight_mode="exp")
    min_delta = (trainer.get("early_stopping") or {}).get("min_delta", 0.0)
    for callback in callbacks:
        callback.on_fit_start(job, state)
    with tqdm(desc="epochs", unit="epoch", initial=state.epoch, total=state.end,
              disable=not distributed.is_main()) as bar:
        while state.epoch < state.end:
            state.epoch, state.improved, start = state.epoch + 1, False, time.perf_counter()
            metrics = train_epoch(net, job, loss_fn, trainer, state)
            if state.interrupted:  # the weights so far, as the end of the last whole epoch (a resume redoes this one)
                state.epoch -= 1
                for callback in callbacks:
                    callback.on_interrupt(job, state)
                break
            metrics |= keep_to_budget(trainer, state)
            bar.total = state.end
            if validating(trainer, state):
                metrics |= validation(job, state, metrics["train_loss"], min_delta)
            step_scheduler(job, state, metrics)
            end_epoch(job, state, metrics, start, callbacks)
            bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", best_dice=f"{state.best['val_dice_mean']:.3f}")
            bar.update()
            if state.stop:
                log.info(state.stop)
                break
    return state.result()
