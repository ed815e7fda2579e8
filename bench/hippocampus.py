"""Hippocampus: held-out test Dice against minutes of CPU training, in one process on one machine, for
(a) a plainly written MONAI tutorial recipe, (b) the final-model recipe (`experiment=hippocampus`, its schedule fitted
to the budget) and (c) its ensemble with mirror TTA, whose minutes count every member's: k folds (`--members folds`, as
`make cv` trains them) or k final models on every non-test case with different seeds (`--members all`, whose first j
members are scored together wherever j / k of the minutes is a mark: the curve of "train one more"). (d), asked for
with `--only ... d --budgets ...`: what a user given N minutes gets, one run per budget with its schedule fitted to
it (`trainer.max_minutes=N`, `--budget-experiment`, by default the few-minute recipe `hippocampus_quick`).

Every recipe trains on the default split's training cases (the folds: on the non-test cases) and is scored on the
same 31 held-out test cases with sliding-window inference; scoring time is not training time. (a) and (b) are scored
once their training time passes each mark, (c) at the largest mark (and, with `--members all`, at its members' marks).
Prints the curve table, the minutes each took to a mean Dice of 0.85 and their ratio, (b)'s throughput against this
machine's matrix-multiply rate, and the CPU class (the figures hold for that class only).

    .venv/bin/python bench/hippocampus.py [--marks 5 10 20 40 80] [--folds 5] [--members folds|all] [--only a b c]
    .venv/bin/python bench/hippocampus.py --only a d --budgets 1 2 3 5 --tutorial-minutes 8 --marks 1 2 3 5 8
    .venv/bin/python bench/hippocampus.py --only d --budgets 1.5 --set data.batch_size=4   # a lever, measured
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from monai.data import DataLoader, Dataset
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    NormalizeIntensityd,
    RandFlipd,
    RandSpatialCropd,
    SpatialPadd,
)
from torch.utils.flop_counter import FlopCounterMode

from pipeline import project_root
from pipeline.core import hardware
from pipeline.core.config import compose
from pipeline.core.rundir import RunDir
from pipeline.data.transforms import loaders
from pipeline.evaluation.metrics import SegmentationScores
from pipeline.evaluation.scoring import evaluate
from pipeline.models.adapters import training_outputs
from pipeline.tracking.runs import NullTracker
from pipeline.training import engine
from pipeline.training.callbacks import Checkpoints
from pipeline.training.run import save_splits, setup, train

from common import RESULTS, machine, machine_line, shared_data, write

TARGET = 0.85
CLASSES = ["background", "Anterior", "Posterior"]
LABEL, CELL = 38, 9  # the table's columns: recipe, then one cell per mark


class Recorder(NullTracker):
    """A Tracker that keeps (training minutes, test mean, anterior, posterior) in memory."""

    def __init__(self):
        self.points = []

    def log_metrics(self, metrics, step):
        if "val_dice_mean" in metrics:
            self.points.append((metrics["train_minutes"], metrics["val_dice_mean"], metrics["val_dice_Anterior"],
                                metrics["val_dice_Posterior"]))


def tutorial(train_cases, test_cases, marks: list[float]) -> list[tuple]:
    """(a) The recipe as a MONAI tutorial writes it: fp32, plain Dataset + DataLoader, random crops, flips, Adam."""
    keys = ["image", "label"]
    load = [LoadImaged(keys), EnsureChannelFirstd(keys), NormalizeIntensityd(keys="image")]
    crop = [SpatialPadd(keys, (48, 64, 48)), RandSpatialCropd(keys, (48, 64, 48), random_size=False)]
    flips = [RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(3)]
    train_loader = DataLoader(Dataset(train_cases, Compose(load + crop + flips)), batch_size=2, shuffle=True,
                              num_workers=2)
    test_loader = DataLoader(Dataset(test_cases, Compose(load)), batch_size=1)
    model = UNet(3, 1, 3, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)
    loss_fn, optimizer = DiceCELoss(to_onehot_y=True, softmax=True), torch.optim.Adam(model.parameters(), 1e-3)
    inferer = SlidingWindowInferer((48, 64, 48), sw_batch_size=4, overlap=0.5)
    scores, points, trained, todo = SegmentationScores(CLASSES), [], 0.0, sorted(marks)
    while todo:
        model.train()
        start = time.perf_counter()
        for batch in train_loader:
            loss = loss_fn(model(batch["image"]), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trained += (time.perf_counter() - start) / 60  # wall time, loading included, as the engine counts it
            if trained >= todo[0]:
                s = engine.validate(model, test_loader, inferer, scores, torch.device("cpu"), None)
                points.append((trained, s["val_dice_mean"], s["val_dice_Anterior"], s["val_dice_Posterior"]))
                print(f"  (a) {trained:5.1f} min  test dice {s['val_dice_mean']:.3f}", flush=True)
                todo = [m for m in todo if m > trained]
                model.train()
                if not todo:
                    break
            start = time.perf_counter()  # scoring is not training time
    return points


def train_config(experiment: str, data: str, run_dir, overrides=()):
    """The training config every recipe of the benchmark but the tutorial starts from: the recipe on the data, no
    tracking, the overrides (later ones win), its own run folder."""
    return compose("train", [f"experiment={experiment}", f"data.root={data}", "tracking=none", *overrides,
                             f"paths.run_dir={run_dir}"])


def kept(experiment: str, data: str, marks: list[float], run_dir, overrides=()) -> tuple[list[tuple], dict]:
    """(b) the kept recipe, trained by the project's engine with its schedule fitted to the largest mark and scored on
    the test split as it passes each mark and at its end. (d) is one such run per budget, with one mark."""
    cfg = train_config(experiment, data, run_dir, [*overrides, f"trainer.max_minutes={max(marks)}",
                                                   f"trainer.val_minutes=[{','.join(map(str, marks))}]",
                                                   "trainer.val_every=1000000",
                                                   "trainer.budget_counts=training"])  # the scoring is the bench's
    run = setup(cfg)
    # so that `pipeline.evaluate ckpt=<kept>/checkpoints/last.pt split=test` works
    save_splits(run.splits, cfg.paths.run_dir)
    train_loader, test_loader = loaders(cfg, run.splits["train"], run.splits["test"])  # scored on the test split
    recorder = Recorder()
    # last.pt is the final model; best.pt here is picked on the test scores, so only last.pt is a fair test model
    run.train_loader, run.val_loader, run.tracker = train_loader, test_loader, recorder
    run.run_dir = RunDir(cfg.paths.run_dir)
    result = engine.fit(cfg.trainer, run, [Checkpoints()])
    batch = cfg.data.batch_size * cfg.transforms.patch.num_samples
    return recorder.points, {"run": run, "cfg": cfg, "steps": len(result["step_losses"]), "batch": batch}


def score(members: list[str], scored: Path) -> tuple:
    """Test (mean, anterior, posterior) Dice of the checkpoints as one ensemble with mirror TTA (pipeline.evaluate),
    its report written to `scored`."""
    summary = evaluate(compose("evaluate", [f"ckpt=[{','.join(members)}]", "split=test", "tta=true",
                                            "tracking=none", f"output={scored}", f"paths.run_dir={scored}"]))
    return summary["mean"]["dice"], *(summary["classes"][c]["dice"]["mean"] for c in CLASSES[1:])


def member_mark(minutes: float, j: int, k: int, marks: list[float]) -> float | None:
    """The mark that j of k members of minutes / k each make, as given (minutes * j / k need not equal it to the last
    bit), or None where they make none."""
    return next((m for m in marks if math.isclose(m, minutes * j / k)), None)


def ensemble(args, minutes: float, marks: list[float]) -> dict:
    """(c) k members of the kept recipe, minutes / k of training each, scored together with mirror TTA: the k folds
    (each fold's best.pt, as `make cv` ensembles them) or, with `--members all`, k `data.fold=all` models with seeds
    0..k-1 (their last.pt: their best.pt was picked on cases they trained on), the first j of them also scored where
    j / k of the minutes is a mark. Returns {mark: (training minutes, mean, anterior, posterior)}."""
    folder, trained, members, points = args.out / args.members, 0.0, [], {}
    folds = args.members == "folds"
    for k in range(args.folds):
        member = [f"data.fold={k}"] if folds else ["data.fold=all", f"seed={k}"]
        result = train(train_config(args.experiment, args.data, folder / str(k),
                                    [*args.set, *member, f"trainer.max_minutes={minutes / args.folds}"]))
        trained += result["train_minutes"]
        run = RunDir(folder / str(k))
        members.append(str(run.best if folds else run.last))
        mark = member_mark(minutes, k + 1, args.folds, marks)
        if k + 1 == args.folds or (not folds and mark):  # k folds are one model only together
            points[mark or minutes] = (trained, *score(members, args.out / f"{args.members}_test_{k + 1}"))
    return points


def step_flops(model, loss_fn, batch: int, patch: list[int], dtype) -> int:
    """FLOPs of one forward + backward training step (torch's flop counter: convolutions and matmuls)."""
    x, y = torch.randn(batch, 1, *patch), torch.randint(0, 3, (batch, 1, *patch))
    with FlopCounterMode(display=False) as counter:
        with hardware.autocast(torch.device("cpu"), dtype):
            out = training_outputs(model(x), y)
        sum(o.sum() for o in (out if isinstance(out, list) else [out])).backward()
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


def at(points, mark: float, last: bool) -> str:
    """The score taken once training passed `mark` minutes (the first point at or after it); at the last mark, the
    final score (a schedule fitted to the budget ends within half an epoch of it, either side)."""
    hit = (points[-1] if last and points and points[-1][0] >= 0.9 * mark
           else next((p for p in points if p[0] >= mark), None))
    return f"{hit[1]:.3f}" if hit else "-"


def cell(key: str, points, mark: float, largest: float, by_mark: dict) -> str:
    """One table cell: (a), (b) scored as they passed the mark; (c), (d) the score they took for that mark: (c)'s
    ensemble of the members trained by it, (d) the run whose budget the mark is."""
    if key in by_mark:
        return f"{by_mark[key][mark][1]:.3f}" if mark in by_mark[key] else "-"
    return at(points, mark, mark == largest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--marks", type=float, nargs="+", default=[5, 10, 20, 40, 80],
                        help="training minutes to score at")
    parser.add_argument("--fine", type=float, default=10,
                        help="also score every minute up to this one (for the minutes to 0.85)")
    parser.add_argument("--tutorial-minutes", type=float, help="train (a) only this long (default: the largest mark)")
    parser.add_argument("--folds", type=int, default=5, help="ensemble members of (c)")
    parser.add_argument("--members", choices=["folds", "all"], default="folds",
                        help="(c)'s members: the k folds, or k data.fold=all models with different seeds")
    parser.add_argument("--experiment", default="hippocampus", help="(b) and (c)'s recipe")
    parser.add_argument("--only", nargs="+", choices=["a", "b", "c", "d"], default=["a", "b", "c"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[1, 2, 3, 5],
                        help="(d): minutes of training, one run fitted to each")
    parser.add_argument("--budget-experiment", default="hippocampus_quick", help="(d)'s recipe")
    parser.add_argument("--data", default=str(shared_data() / "msd_hippocampus"))
    parser.add_argument("--set", nargs="+", default=[], metavar="OVERRIDE",
                        help="Hydra overrides for (b), (c) and (d), e.g. --set data.batch_size=4 optimizer.lr=0.004")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where hippocampus.md and .json go")
    parser.add_argument("--out", type=Path, default=project_root() / "outputs" / "bench" / "hippocampus",
                        help="where the runs, their checkpoints and the scores go")
    args = parser.parse_args()
    marks = sorted(set(args.marks) | {float(m) for m in range(1, int(args.fine) + 1)})
    device = hardware.pick_device()
    print(f"{hardware.describe(device)}; {hardware.resolve('auto', device)}; marks {args.marks} min of training"
          + (f"; (b, c, d) with {' '.join(args.set)}" if args.set else ""))

    split = setup(train_config(args.experiment, args.data, args.out / "split")).splits
    rows, by_mark = {}, {}  # (c), (d): {mark: the score taken for it}
    c_label = (f"{args.folds}-fold ensemble" if args.members == "folds"
               else f"{args.folds} x data.fold=all ensemble")
    if "b" in args.only:
        print(f"(b) experiment={args.experiment}")
        rows["b"], info = kept(args.experiment, args.data, marks, args.out / "kept", args.set)
    if "a" in args.only:
        print("(a) tutorial recipe")
        minutes = args.tutorial_minutes or max(marks)  # (a) is scored at its end too, whatever the marks
        rows["a"] = tutorial(split["train"], split["test"], sorted({m for m in marks if m < minutes} | {minutes}))
    if "c" in args.only:
        print(f"(c) {c_label}, {max(args.marks) / args.folds:g} min each, mirror TTA")
        by_mark["c"] = ensemble(args, max(args.marks), args.marks)
    if "d" in args.only:
        print(f"(d) experiment={args.budget_experiment}, one run fitted to each budget: {args.budgets} min")
        by_mark["d"] = {b: kept(args.budget_experiment, args.data, [b], args.out / f"budget_{b:g}", args.set)[0][-1]
                        for b in sorted(args.budgets)}  # budget -> its run's final score
    rows |= {key: list(scores.values()) for key, scores in by_mark.items()}  # (c), (d) in the order they were taken

    labels = {"a": "(a) MONAI tutorial recipe", "b": f"(b) experiment={args.experiment}",
              "c": f"(c) {c_label} + TTA", "d": f"(d) {args.budget_experiment}, fitted"}
    table = [f"held-out test split: {len(split['test'])} cases; mean Dice after N minutes of training; "
             f"{hardware.cpu_class()}",
             f"{'recipe':{LABEL}s}" + "".join(f"{f'{m:g} min':>{CELL}s}" for m in args.marks)
             + f"{f'to {TARGET}':>11s}  final (anterior, posterior)"]
    for key in ("a", "b", "c", "d"):
        if key in rows:
            points = rows[key]
            reach = minutes_to(points) if key != "c" else None
            m, dice, ant, post = points[-1]
            cells = "".join(f"{cell(key, points, mark, max(args.marks), by_mark):>{CELL}s}" for mark in args.marks)
            table.append(f"{labels[key]:{LABEL}s}{cells}{f'{reach:.1f} min' if reach else '-':>11s}"
                         f"  {dice:.3f} ({ant:.3f}, {post:.3f}) after {m:.1f} min")
    for key in ("b", "d"):
        if "a" in rows and key in rows:
            ta, tk = minutes_to(rows["a"]), minutes_to(rows[key])
            if ta and tk:
                table.append(f"minutes to {TARGET}: ({key}) x{ta / tk:.1f} sooner than (a)")
    if "b" in rows:
        run, cfg = info["run"], info["cfg"]
        seconds = rows["b"][-1][0] * 60
        flops = step_flops(run.model, run.loss_fn, info["batch"], list(cfg.data.patch_size), run.precision.dtype)
        peak = matmul_gflops(run.precision.dtype or torch.float32)
        achieved = flops * info["steps"] / seconds / 1e9
        table.append(f"(b) throughput: {info['steps']} steps of {info['batch']} x {list(cfg.data.patch_size)}, "
                     f"model step {flops / 1e9:.1f} GFLOP -> {achieved:.1f} GFLOP/s; "
                     f"{run.precision.name} matmul {peak:.1f} GFLOP/s "
                     f"(model at {100 * achieved / peak:.0f}% of it)")
    print("\n" + "\n".join(table))
    results = {"machine": machine(), "command": " ".join(sys.argv[1:]), "marks": args.marks,
               "test_cases": len(split["test"]), "recipes": {labels[k]: v for k, v in rows.items()}}
    page = ["# Hippocampus: test Dice against minutes of training", "",
            "Written by `bench/hippocampus.py` (do not edit by hand), its latest run: "
            f"`bench/hippocampus.py {results['command']}`. The record of every run and lever: "
            "[hippocampus.md](../hippocampus.md).", "", machine_line(results["machine"]), "", "```", *table, "```"]
    print(f"wrote {write('hippocampus', results, chr(10).join(page), args.results)}")


if __name__ == "__main__":
    main()
