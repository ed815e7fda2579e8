"""Hippocampus: a plainly written MONAI tutorial recipe (a) against `experiment=hippocampus` (b), one run.

Both train on the same split for the same wall-clock budget and are scored on the same held-out test cases with
sliding-window inference at intervals (scoring time is not counted as training time). Prints the final test mean
Dice (anterior, posterior), the training minutes each took to reach a mean Dice of 0.85 and their ratio, and the
throughput of (b) against this machine's matrix-multiply rate at (b)'s precision, measured in the same run, and
the CPU class (the figures hold for that class only).

    .venv/bin/python bench/hippocampus.py [--minutes 20] [--data ../shared/data/msd_hippocampus]
"""

import argparse
import time

import torch
from monai.data import DataLoader, Dataset
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd, RandFlipd, RandSpatialCropd, SpatialPadd
from torch.utils.flop_counter import FlopCounterMode

from pipeline import engine, hardware, project_root
from pipeline.config import compose, shared_data
from pipeline.data.transforms import loaders
from pipeline.metrics import SegmentationScores
from pipeline.tracking import NullTracker
from pipeline.train import setup

TARGET = 0.85
CLASSES = ["background", "Anterior", "Posterior"]


class Recorder(NullTracker):
    """A Tracker that keeps (training minutes, test scores) in memory."""

    def __init__(self):
        self.points = []

    def log_metrics(self, metrics, step):
        if "val_dice_mean" in metrics:
            self.points.append((metrics["train_minutes"], metrics["val_dice_mean"], metrics["val_dice_Anterior"], metrics["val_dice_Posterior"]))


def tutorial(train_cases, test_cases, minutes: float, eval_every_min: float) -> tuple[list, dict]:
    """(a) The recipe as a MONAI tutorial writes it: fp32, plain Dataset + DataLoader, random crops, flips."""
    keys = ["image", "label"]
    load = [LoadImaged(keys), EnsureChannelFirstd(keys), NormalizeIntensityd(keys="image")]
    crop = [SpatialPadd(keys, (48, 64, 48)), RandSpatialCropd(keys, (48, 64, 48), random_size=False)]
    flips = [RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(3)]
    train_loader = DataLoader(Dataset(train_cases, Compose(load + crop + flips)), batch_size=2, shuffle=True, num_workers=2)
    test_loader = DataLoader(Dataset(test_cases, Compose(load)), batch_size=1)
    model = UNet(3, 1, 3, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)
    loss_fn, optimizer = DiceCELoss(to_onehot_y=True, softmax=True), torch.optim.Adam(model.parameters(), 1e-3)
    inferer = SlidingWindowInferer((48, 64, 48), sw_batch_size=4, overlap=0.5)
    scores, points, trained, next_eval, steps = SegmentationScores(CLASSES), [], 0.0, eval_every_min, 0
    while trained < minutes:
        model.train()
        start = time.perf_counter()
        for batch in train_loader:
            loss = loss_fn(model(batch["image"]), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trained += (time.perf_counter() - start) / 60  # wall time, loading included, as the engine counts it
            start = time.perf_counter()
            steps += 1
            if trained >= next_eval or trained >= minutes:
                s = engine.validate(model, test_loader, inferer, scores, torch.device("cpu"), None)
                points.append((trained, s["val_dice_mean"], s["val_dice_Anterior"], s["val_dice_Posterior"]))
                print(f"  (a) {trained:5.1f} min  test dice {s['val_dice_mean']:.3f}", flush=True)
                next_eval += eval_every_min
                model.train()
                start = time.perf_counter()  # scoring is not training time
            if trained >= minutes:
                break
    return points, {"steps": steps, "voxels_per_step": 2 * 48 * 64 * 48}


def project(data: str, minutes: float, test_cases_out: list) -> tuple[list, dict, dict]:
    """(b) `experiment=hippocampus`, trained by the project's engine, scored on the test split."""
    cfg = compose("train", ["experiment=hippocampus", f"data.root={data}", "tracking=none", f"trainer.max_minutes={minutes}",
                                f"paths.run_dir={project_root()}/outputs/bench/hippocampus"])
    run = setup(cfg)
    test_cases_out.extend(run.splits["test"])
    train_loader, test_loader = loaders(cfg, run.splits["train"], run.splits["test"])
    recorder = Recorder()
    result = engine.fit(cfg.trainer, run.model, run.loss_fn, run.optimizer, run.scheduler, train_loader, test_loader, run.inferer,
                        cfg.data.class_names, recorder, f"{cfg.paths.run_dir}/checkpoints", {}, run.device, run.precision)
    patch = list(cfg.data.patch_size)
    voxels = cfg.data.batch_size * cfg.transforms.patch.num_samples * int(torch.tensor(patch).prod())
    return recorder.points, {"steps": len(result["step_losses"]), "voxels_per_step": voxels, "patch": patch,
                             "batch": cfg.data.batch_size * cfg.transforms.patch.num_samples}, {"run": run, "cfg": cfg}


def step_flops(model, loss_fn, batch: int, patch: list[int], dtype) -> int:
    """FLOPs of one forward + backward training step (torch's flop counter: convolutions and matmuls)."""
    x, y = torch.randn(batch, 1, *patch), torch.randint(0, 3, (batch, 1, *patch))
    with FlopCounterMode(display=False) as counter:
        with hardware.autocast(torch.device("cpu"), dtype):
            logits = model(x)
        loss_fn(logits.float(), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_gflops(dtype=torch.float32, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def minutes_to(points, target=TARGET):
    return next((m for m, dice, *_ in points if dice >= target), None)


def main() -> None:
    default_data = str(shared_data() / "msd_hippocampus")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget of each recipe")
    parser.add_argument("--eval-every", type=float, default=1.0, help="minutes of training between test scorings of (a)")
    parser.add_argument("--data", default=default_data)
    parser.add_argument("--only", choices=["a", "b"], help="run one recipe only")
    args = parser.parse_args()
    device = engine.pick_device()
    print(f"{hardware.describe(device)}; {hardware.resolve('auto', device)}; budget {args.minutes} min of training per recipe")

    test_cases = []
    results = {}
    if args.only != "a":
        print("(b) experiment=hippocampus")
        points, info, extra = project(args.data, args.minutes, test_cases)
        results["b"] = (points, info)
        for m, dice, *_ in points:
            print(f"  (b) {m:5.1f} min  test dice {dice:.3f}")
    if args.only != "b":
        if not test_cases:  # the same split as (b) would use
            cfg = compose("train", ["experiment=hippocampus", f"data.root={args.data}", "tracking=none", "paths.run_dir=/tmp"])
            splits = setup(cfg).splits
            train_cases, test_cases = splits["train"], splits["test"]
        else:
            train_cases = extra["run"].splits["train"]
        print("(a) tutorial recipe")
        results["a"] = tutorial(train_cases, test_cases, args.minutes, args.eval_every)

    print(f"\nheld-out test split: {len(test_cases)} cases; target mean Dice {TARGET}")
    for key, label in (("a", "tutorial recipe"), ("b", "experiment=hippocampus")):
        if key in results:
            points, info = results[key]
            m, dice, ant, post = points[-1]
            reach = minutes_to(points)
            print(f"({key}) {label:24s} final test mean Dice {dice:.3f} (anterior {ant:.3f}, posterior {post:.3f}) "
                  f"after {m:.1f} min; reached {TARGET} after {f'{reach:.1f} min' if reach else 'never'}; "
                  f"best {max(p[1] for p in points):.3f}")
    if "a" in results and "b" in results:
        ta, tb = minutes_to(results["a"][0]), minutes_to(results["b"][0])
        if ta and tb:
            print(f"minutes to {TARGET}: (b)/(a) = {tb / ta:.3f}, i.e. (b) is x{ta / tb:.1f} sooner")
        elif tb:
            print(f"minutes to {TARGET}: (a) never within {args.minutes} min, so (b) is more than x{args.minutes / tb:.1f} sooner")
    if "b" in results:
        points, info = results["b"]
        run, cfg = extra["run"], extra["cfg"]
        seconds = points[-1][0] * 60
        flops = step_flops(run.model, run.loss_fn, info["batch"], info["patch"], run.precision.dtype)
        peak = matmul_gflops(run.precision.dtype or torch.float32)
        achieved = flops * info["steps"] / seconds / 1e9
        print(f"(b) throughput: {info['steps']} steps, {info['voxels_per_step'] * info['steps'] / seconds / 1e6:.2f} M voxels/s, "
              f"model step {flops / 1e9:.1f} GFLOP -> {achieved:.1f} GFLOP/s; {run.precision.name} matmul {peak:.1f} GFLOP/s "
              f"(model at {100 * achieved / peak:.0f}% of it)")


if __name__ == "__main__":
    main()
