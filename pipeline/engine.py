"""The training and validation loop: plain torch, readable top to bottom. It reports to a Tracker, never to MLflow."""

import math
import time
from pathlib import Path

import nibabel as nib
import torch
from monai.losses import DeepSupervisionLoss
from omegaconf import DictConfig
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm.auto import tqdm

from pipeline import checkpoint, distributed, plots
from pipeline.data.sources import case_id
from pipeline.hardware import Precision, autocast, channels_last
from pipeline.io import ras_spacing
from pipeline.metrics import SegmentationScores
from pipeline.models.teaching import MirrorPadded, centre_crop
from pipeline.rundir import RunDir


def pick_device(name: str = "auto") -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def outputs(out, label: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    """A network's training output(s) in fp32, the full-resolution main output first when there are several."""
    if isinstance(out, (list, tuple)):  # BasicUNetPlusPlus: nested decoder outputs, the most refined last
        return [o.float() for o in reversed(out)] if len(out) > 1 else out[0].float()
    if out.dim() == label.dim() + 1:  # DynUNet with deep supervision: (B, 1 + n, C, ...), the main output first
        return [o.float() for o in out.unbind(1)]
    return out.float()


class ForInference(torch.nn.Module):
    """What sliding-window inference and export run: one (B, K, ...) logits tensor the size of the input, whatever
    the network returns (a list of deep-supervision outputs, one sigmoid channel, a smaller valid output)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        # An unpadded network sees a mirror-padded input so its output covers the window (the 2015 overlap-tile idea).
        self.net = MirrorPadded(net) if hasattr(net, "output_size") else net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, (list, tuple)):  # BasicUNetPlusPlus returns a list even in eval mode; the last is final
            out = out[-1]
        # One sigmoid logit z is the two-class softmax logits (0, z): softmax((0, z)) = (1 - sigmoid(z), sigmoid(z)),
        # so argmax, TTA averaging and probability maps work unchanged for binary networks.
        return torch.cat([torch.zeros_like(out), out], 1) if out.shape[1] == 1 else out


def for_inference(model: torch.nn.Module) -> ForInference:
    """`model` wrapped for inference, in eval mode (a new wrapper would be in training mode, and so would its network
    after anything, e.g. torch.onnx.export, restores the wrapper's mode)."""
    return model if isinstance(model, ForInference) else ForInference(model).eval()


@torch.no_grad()
def predict(model, image: torch.Tensor, inferer, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Float32 class logits (B, K, ...) for whole volumes, by the (sliding-window) inferer."""
    model.eval()
    with autocast(device, dtype):
        return inferer(image.to(device), for_inference(model)).float()


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


def validation_overlay(model, loader, inferer, class_names, spacing, device, dtype, path: Path) -> Path:
    """Input, truth and prediction of the first validation case (plots.overlay), to watch a run learn."""
    batch = next(iter(loader))
    pred = predict(model, batch["image"][:1], inferer, device, dtype).argmax(1)[0].cpu().numpy()
    truth = batch["label"][0, 0].numpy().astype(int)
    return plots.overlay(batch["image"][0, 0].numpy(), truth, pred, spacing, class_names, path, title=path.stem)


def batch_loss(model, batch: dict, loss_fn, device, dtype) -> torch.Tensor:
    """One batch's training loss, in fp32 (softmax/log of bf16 logits loses precision); an unpadded network's
    smaller output is scored against the centre of the label."""
    image, label = batch["image"].to(device), batch["label"].to(device)
    with autocast(device, dtype):
        out = outputs(model(image), label)
    main = out[0] if isinstance(out, list) else out
    return loss_fn(out, centre_crop(label, main.shape[2:]))


def budgeted_epochs(trainer: DictConfig, epoch: int, train_seconds: float, epoch_seconds: list[float]) -> int | None:
    """The epoch the run should end at so that it ends at trainer.max_minutes of training on this machine (None
    without a budget): the remaining minutes divided by the mean epoch time so far (the first epoch, which pays
    one-off costs such as compilation, left out once others are measured), capped by trainer.max_epochs."""
    if trainer.get("max_minutes") is None or not trainer.get("fit_to_budget", True) or not epoch_seconds:
        return None
    measured = epoch_seconds[1:] or epoch_seconds
    remaining = round((60 * trainer.max_minutes - train_seconds) * len(measured) / sum(measured))
    return max(epoch, min(trainer.max_epochs, epoch + remaining))


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


def fit(
    trainer: DictConfig,
    model: torch.nn.Module,
    loss_fn,
    optimizer: torch.optim.Optimizer,
    scheduler,
    train_loader,
    val_loader,
    inferer,
    class_names: list[str],
    tracker,
    run_dir: RunDir,
    config: dict,
    device: torch.device,
    precision: Precision,
    resume: dict | None = None,
    schedule=None,
) -> dict:
    """Train for trainer.max_epochs (or until trainer.max_minutes of training); validate every trainer.val_every
    epochs and after the last; keep best.pt and last.pt in run_dir's checkpoints/. `resume`: a loaded last.pt to
    continue from.

    With a time budget (trainer.max_minutes, trainer.fit_to_budget) the run length is re-estimated after every
    epoch from the measured epoch times, and `schedule` (epochs -> a new scheduler, the config's with that length)
    rebuilds the learning-rate schedule to match, so it anneals by the budget's end on whatever machine runs it.

    Under DDP (trainer=ddp) every rank runs this on its own share of the cases: gradients, the training loss and the
    validation scores are averaged over ranks, so every rank takes the same decisions; rank 0 alone writes files.
    """
    model.to(device)
    if trainer.get("channels_last"):  # before any state is loaded: load_state_dict keeps the parameters' format
        channels_last(model)
    dtype = precision.dtype
    scores = SegmentationScores(class_names)
    # Several outputs (deep supervision): MONAI weighs their losses 1, 1/2, 1/4, ... against a resized label.
    supervised = DeepSupervisionLoss(loss_fn, weight_mode="exp")
    accumulate = trainer.get("accumulate") or 1  # optimizer steps every `accumulate` batches
    stop = trainer.get("early_stopping") or {}
    stale = 0  # validations since the best one (early stopping)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # bf16 has fp32's range: no scaling
    best = {"val_dice_mean": -math.inf, "epoch": 0}
    step_losses, history, train_seconds, epoch = [], [], 0.0, 0
    end, epoch_seconds = trainer.max_epochs, []  # the last epoch (fitted to the time budget, if there is one)
    scheduled = end  # the run length the scheduler was built for (a resumed one: as it was saved)
    augment = train_loader.dataset.transform  # its random transforms' states go into last.pt
    if resume is not None:  # continue where last.pt left off: weights, optimizer moments, LR, every RNG stream
        model.load_state_dict(resume["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        best, epoch, train_seconds = resume["metrics"], resume["epoch"], 60 * resume["train_minutes"]
        history, stale = resume.get("history", []), resume.get("stale", 0)
        epoch_seconds, scheduled = resume.get("epoch_seconds", []), resume.get("end_epoch", end)
        if trainer.get("max_minutes") is not None and trainer.get("fit_to_budget", True):
            end = scheduled  # the length fitted to the budget; without one, max_epochs decides
        if (rng := distributed.own_rng(resume["rng"])) is not None:
            checkpoint.restore_rng(rng, augment)
    if schedule is not None and scheduled != end and not isinstance(scheduler, ReduceLROnPlateau):
        scheduler, scheduled = reschedule(schedule, optimizer, end, epoch), end  # resumed with another max_epochs
    # Under DDP the forward and backward passes run through the wrapper (it averages the gradients over ranks);
    # validation and checkpoints use the plain model. trainer.compile compiles the training step only: validation's
    # whole volumes differ in shape and would recompile.
    stepper = torch.compile(model) if trainer.get("compile") else model
    net = distributed.wrap(stepper, device, (trainer.get("ddp") or {}).get("find_unused_parameters", False))
    quiet = not distributed.is_main()  # progress bars from rank 0 only

    epochs = tqdm(desc="epochs", unit="epoch", initial=epoch, total=end, disable=quiet)
    while epoch < end:
        epoch += 1
        model.train()
        start, losses = time.perf_counter(), []
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(tqdm(train_loader, desc=f"epoch {epoch}", unit="step", leave=False, disable=quiet),
                                  start=1):
            stepping = i % accumulate == 0 or i == len(train_loader)
            with distributed.local_gradients(net, not stepping):
                loss = batch_loss(net, batch, supervised, device, dtype)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"epoch {epoch}: loss is {loss.item()}; "
                                             "lower optimizer.lr or set trainer.amp=false")
                # Gradients of `accumulate` batches add up before one step: the mean over a k-times larger batch.
                scaler.scale(loss / accumulate).backward()
            if stepping:
                if trainer.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        step_losses += losses
        epoch_seconds.append(distributed.maximum(time.perf_counter() - start))  # the slowest rank's: all stop together
        train_seconds += epoch_seconds[-1]
        if (fitted := budgeted_epochs(trainer, epoch, train_seconds, epoch_seconds)) is not None:
            if len(epoch_seconds) == 2 and not quiet:  # the first estimate without the first epoch's one-off costs
                tqdm.write(f"trainer.max_minutes={trainer.max_minutes}: {fitted} epochs fit "
                           f"({epoch_seconds[-1]:.1f} s each); "
                           f"the learning-rate schedule ends there")
            end, epochs.total = fitted, fitted
        out_of_time = (fitted is None and trainer.get("max_minutes") is not None
                       and train_seconds >= 60 * trainer.max_minutes)
        log = {
            "train_loss": distributed.mean(sum(losses), len(losses)),  # over every rank's steps
            "lr": optimizer.param_groups[0]["lr"],
            "train_minutes": train_seconds / 60,  # training only, validation excluded
            **({"planned_epochs": end} if fitted is not None else {}),
        }

        # trainer.val_minutes: also validate at the first epoch end past each of these training minutes (a curve)
        passed = any(train_seconds - epoch_seconds[-1] < 60 * m <= train_seconds
                     for m in trainer.get("val_minutes") or [])
        if epoch % trainer.val_every == 0 or epoch >= end or out_of_time or passed:
            log.update(validate(model, val_loader, inferer, scores, device, dtype))
            per_class = ", ".join(f"{n} {log[f'val_dice_{n}']:.3f}" for n in class_names[1:])
            tqdm.write(f"epoch {epoch:3d}  loss {log['train_loss']:.4f}  val dice {log['val_dice_mean']:.3f} "
                       f"({per_class})  iou {log['val_iou_mean']:.3f}")
            if trainer.get("overlay_every") and epoch % trainer.overlay_every == 0 and distributed.is_main():
                spacing = config["data"]["spacing"] or ras_spacing(nib.load(val_loader.dataset.data[0]["image"]).affine)
                png = validation_overlay(model, val_loader, inferer, class_names, spacing, device, dtype,
                                         run_dir.overlays / f"epoch{epoch:04d}.png")
                tracker.log_artifact(png, "overlays")
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(log["val_dice_mean"])
            stale = 0 if log["val_dice_mean"] > best["val_dice_mean"] + stop.get("min_delta", 0.0) else stale + 1
            if log["val_dice_mean"] > best["val_dice_mean"]:
                best = {k: v for k, v in log.items() if k.startswith("val_")} | {"epoch": epoch}
                if distributed.is_main():
                    checkpoint.save(run_dir.best, model, config, epoch=epoch, metrics=best,
                                    run_id=tracker.run_id, precision=precision.record())
        if scheduler is not None and not isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step()
            # the run's length changed: so does the schedule
            if schedule is not None and scheduled != end and epoch < end:
                scheduler, scheduled = reschedule(schedule, optimizer, end, epoch), end
        log["epoch_time"] = time.perf_counter() - start

        tracker.log_metrics(log, step=epoch)
        history.append({"epoch": epoch} | log)
        epochs.set_postfix(loss=f"{log['train_loss']:.4f}", best_dice=f"{best['val_dice_mean']:.3f}")
        distributed.debug("epoch", epoch=epoch, log=log)
        # last.pt carries what a resume needs; best.pt only what inference needs.
        rng = distributed.rng_states(checkpoint.rng_state(augment))  # under DDP every rank's augmentation streams
        if distributed.is_main():
            checkpoint.save(
                run_dir.last, model, config, epoch=epoch, metrics=best, train_minutes=train_seconds / 60,
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict() if scheduler else None,
                scaler=scaler.state_dict(),
                rng=rng, run_id=tracker.run_id, history=history, stale=stale, precision=precision.record(),
                end_epoch=end, epoch_seconds=epoch_seconds,
            )
        epochs.update()
        if out_of_time:
            tqdm.write(f"stopping after epoch {epoch}: trainer.max_minutes={trainer.max_minutes} of training reached")
            break
        if stop.get("patience") and stale >= stop["patience"]:
            tqdm.write(f"early stopping after epoch {epoch}: val Dice has not risen by more than "
                       f"{stop.get('min_delta', 0.0)} "
                       f"for {stale} validations (best {best['val_dice_mean']:.4f} at epoch {best['epoch']})")
            break
    epochs.close()
    return {"best": best, "step_losses": step_losses, "history": history, "epochs": epoch,
            "train_minutes": train_seconds / 60}
