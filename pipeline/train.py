"""Training entry point: `python -m pipeline.train [key=value ...]` (also `--multirun` for sweeps)."""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import hydra
import torch
from hydra.utils import instantiate
from monai.utils import set_determinism
from omegaconf import DictConfig, OmegaConf

from pipeline import engine
from pipeline.data.sources import case_id, resolve_data, split
from pipeline.data.transforms import loaders
from pipeline.errors import exit_on_input_error
from pipeline.planning import apply_plan


def run_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn) -> str:
    """`<Model>_<Optimizer>_<Loss>`, e.g. UNet_Adam_DiceLoss."""
    model_name = getattr(model, "run_name", type(model).__name__)
    return f"{model_name}_{type(optimizer).__name__}_{type(loss_fn).__name__}"


def save_splits(splits: dict[str, list[dict]], run_dir: str) -> Path:
    """splits.json: case ids per split, so a run's test set can be re-scored later."""
    path = Path(run_dir) / "splits.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: [case_id(c) for c in v] for k, v in splits.items()}, indent=1))
    return path


def setup(cfg: DictConfig) -> SimpleNamespace:
    """Data, split, plan and every component, built from the config (shared by `train` and the benchmarks)."""
    dataset = resolve_data(cfg)  # fills data.num_classes etc., which the other groups interpolate
    set_determinism(seed=cfg.seed)
    s = cfg.data.split
    splits = split(dataset.cases, s.val, s.test, s.seed, s.folds, cfg.data.fold)
    apply_plan(cfg, dataset.modalities, splits["train"])  # fills values set to `auto` (plan=auto)
    model = instantiate(cfg.model)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    device = engine.pick_device(cfg.trainer.device)
    return SimpleNamespace(
        splits=splits,
        model=model,
        loss_fn=instantiate(cfg.loss),
        optimizer=optimizer,
        scheduler=instantiate(cfg.scheduler)(optimizer) if cfg.scheduler else None,
        inferer=instantiate(cfg.trainer.inferer),
        device=device,
        dtype=engine.amp_dtype(cfg.trainer.amp, device),
    )


def train(cfg: DictConfig) -> dict:
    """Build every component from the config, train, and return {"best": metrics, "step_losses": [...], ...}."""
    run = setup(cfg)
    splits, model, optimizer, loss_fn, device, dtype = run.splits, run.model, run.optimizer, run.loss_fn, run.device, run.dtype
    train_cases, val_cases = splits["train"], splits["val"]
    train_loader, val_loader = loaders(cfg, train_cases, val_cases)

    config = OmegaConf.to_container(cfg, resolve=True)
    name = run_name(model, optimizer, loss_fn)
    tracker = instantiate(cfg.tracking)
    tracker.start(name, config, tags={"seed": cfg.seed, "device": str(device), "amp": str(dtype).removeprefix("torch.") if dtype else "fp32"})
    splits_file = save_splits(splits, cfg.paths.run_dir)
    tracker.log_artifact(splits_file)
    print(f"{name}: {len(train_cases)} train / {len(val_cases)} val / {len(splits['test'])} test cases from {cfg.data.root} on {device}, amp {dtype}")
    status, start = "FAILED", time.perf_counter()
    try:
        result = engine.fit(
            cfg.trainer, model, loss_fn, optimizer, run.scheduler, train_loader, val_loader, run.inferer,
            cfg.data.class_names, tracker, f"{cfg.paths.run_dir}/checkpoints", config, device, dtype,
        )
        for ckpt in ("best.pt", "last.pt"):
            tracker.log_artifact(f"{cfg.paths.run_dir}/checkpoints/{ckpt}", "checkpoints")
        status = "FINISHED"
    finally:
        tracker.finish(status)
    minutes = (time.perf_counter() - start) / 60
    print(f"{name}: best val dice {result['best']['val_dice_mean']:.4f} at epoch {result['best']['epoch']} "
          f"({result['epochs']} epochs in {minutes:.1f} min); checkpoints in {cfg.paths.run_dir}/checkpoints")
    return result | {"run_name": name, "run_id": tracker.run_id}


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
@exit_on_input_error
def main(cfg: DictConfig) -> float:
    # The return value is what Hydra sweepers (e.g. Optuna) optimise.
    return train(cfg)["best"]["val_dice_mean"]


if __name__ == "__main__":
    main()
