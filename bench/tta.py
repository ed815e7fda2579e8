"""Test-time mirroring and window overlap, task by task: what each set of mirrored axes buys in Dice against the truth
and costs in network passes, on cases the model never trained on, into docs/results/tta.{md,json}.

    .venv/bin/python bench/tta.py ibsr                       # bench/auto.py's fold-0 model of the task
    .venv/bin/python bench/tta.py acdc --ckpt <run>/checkpoints/last.pt --cases 10

The cases are the run's test split where it has one, else its validation fold. Each case is predicted once per
single mirror (every subset of the axes the model's training mirrored) at each overlap; the prediction of a set of
axes (`tta_axes=`) is the mean of the probabilities of its mirrors, as `tta=true` averages them, so that every set is
scored from the same passes. Its cost is its number of passes, each timed here (seconds a pass, per overlap).
"""

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline import project_root
from pipeline.evaluation.precision import dice as mask_dice
from pipeline.inference.predictor import Predictor, mirrored_axes, mirrors
from pipeline.models import checkpoint

from common import RESULTS, machine, machine_line, write

TASKS = ("acdc", "brats", "hippocampus", "ibsr")
OVERLAPS = (0.5, 0.25)  # the recipe's (nnU-Net's), and MONAI's default: about 2.4x fewer windows on a brain
HOLDS = 0.001  # a cheaper setting holds where its mean Dice is within this of the full set's at the recipe's overlap


def default_ckpt(task: str) -> Path:
    """bench/auto.py's model of the task: its final model where the task holds a test split, else fold 0."""
    folds = project_root() / "outputs" / "bench" / "auto" / task / "folds"
    final = folds / "all" / "checkpoints" / "last.pt"
    return final if final.is_file() else folds / "0" / "checkpoints" / "last.pt"


def task_parser(description: str, page: str) -> argparse.ArgumentParser:
    """The arguments bench/tta.py and bench/precision.py share: a task, its model, how many unseen cases, where."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--ckpt", type=Path, help="the model (default: bench/auto.py's of the task)")
    parser.add_argument("--cases", type=int, default=10, help="at most this many unseen cases")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"where {page}.md and {page}.json go")
    return parser


def unseen(args: argparse.Namespace) -> tuple[Path, Path, list[str], str]:
    """The model, its data root, up to --cases cases it never trained on (its run's test split, else its validation
    fold) and which of the two they are."""
    ckpt = args.ckpt or default_ckpt(args.task)
    splits = json.loads((ckpt.parent.parent / "splits.json").read_text())
    root = Path(checkpoint.load(ckpt)["config"]["data"]["root"])
    split = "test split" if splits.get("test") else "validation fold"
    return ckpt, root, (splits.get("test") or splits["val"])[: args.cases], split


def dice(pred: np.ndarray, truth: np.ndarray, classes: int) -> dict[int, float]:
    """Dice per foreground class present in the truth or the prediction (the label check's)."""
    scores = {c: mask_dice(pred == c, truth == c) for c in range(1, classes)}
    return {c: d for c, d in scores.items() if not np.isnan(d)}


def measure(ckpt: Path, cases: list[str], root: Path) -> dict:
    """Per overlap: seconds a pass, and per set of mirrored axes its passes and mean Dice per class over the cases."""
    bundle = checkpoint.load(ckpt)
    names = list(bundle["config"]["data"]["class_names"])
    axes = mirrored_axes([bundle["config"]])
    sets = mirrors(axes)  # a mirror flips a subset of the axes; the mirrors `tta_axes=<set>` averages: its subsets
    result = {"axes": list(axes), "cases": cases, "overlaps": {}}
    for overlap in OVERLAPS:
        predictor = Predictor({ckpt: bundle}, overlap=overlap)
        scores, seconds = {tuple(s): [] for s in sets}, []
        for case in cases:
            probs = {}
            for m in sets:
                predictor.flips = [m]  # one mirror a pass (tta=true would average them all in one sliding window)
                start = time.perf_counter()
                _, p, _ = predictor(root / "imagesTr" / f"{case}.nii.gz", probabilities=True)
                seconds.append(time.perf_counter() - start)
                probs[tuple(m)] = p.astype(np.float16)  # half the memory of a brain's 8 maps; argmax unchanged
            truth = np.asarray(nib.load(root / "labelsTr" / f"{case}.nii.gz").dataobj).reshape(p.shape[1:])
            for s in sets:
                members = [probs[tuple(m)] for m in sets if set(m) <= set(s)]
                mean = np.mean([m.astype(np.float32) for m in members], axis=0)
                scores[tuple(s)].append(dice(mean.argmax(0), truth, len(names)))
            print(f"  overlap {overlap}: {case} done ({np.mean(seconds):.2f} s a pass)", flush=True)
        result["overlaps"][str(overlap)] = {
            "seconds_per_pass": round(float(np.mean(seconds)), 3),
            "sets": {",".join(map(str, s)) or "none": {
                "passes": 2 ** len(s),
                "dice": {names[c]: round(float(np.mean([d[c] for d in scores[tuple(s)] if c in d])), 4)
                         for c in range(1, len(names)) if any(c in d for d in scores[tuple(s)])},
            } for s in sets}}
        for row in result["overlaps"][str(overlap)]["sets"].values():
            row["mean"] = round(float(np.mean(list(row["dice"].values()))), 4)
    return result


def cheapest(r: dict) -> str:
    """The fewest passes whose mean Dice holds within HOLDS of every mirror at the recipe's overlap."""
    full = r["overlaps"][str(OVERLAPS[0])]["sets"]
    best = max(full.values(), key=lambda s: s["passes"])["mean"]
    options = [(s["passes"] * r["overlaps"][o]["seconds_per_pass"], o, name)
               for o in r["overlaps"] for name, s in r["overlaps"][o]["sets"].items() if s["mean"] >= best - HOLDS]
    cost, overlap, name = min(options)
    return f"overlap {overlap}, mirrored axes {name} ({cost:.1f} s a case)"


def page(rows: dict) -> str:
    lines = ["# Test-time mirroring and overlap, task by task", "",
             "Written by `bench/tta.py` (do not edit by hand). Mean Dice over the foreground classes against the "
             "truth on cases the model never trained on, for each set of mirrored axes (`tta_axes=`; `none`: no TTA) "
             "at two sliding-window overlaps, and its cost: passes x seconds a pass. *Holds*: the cheapest setting "
             f"whose mean Dice is within {HOLDS} of all mirrors at overlap {OVERLAPS[0]}.", ""]
    for task, r in rows.items():
        overlaps = list(r["overlaps"])
        lines += [f"## {task}", "", f"Model `{r['model']}`, {len(r['cases'])} cases ({r['split']}). "
                  f"{machine_line(r['machine'])}", "",
                  "| mirrored axes | passes | " + " | ".join(
                      f"overlap {o}: mean Dice (per class) | s a case" for o in overlaps) + " |",
                  "| --- | --- | " + " | ".join("--- | ---" for _ in overlaps) + " |"]
        for name, s in r["overlaps"][overlaps[0]]["sets"].items():
            cells = []
            for o in overlaps:
                x = r["overlaps"][o]["sets"][name]
                cells.append(f"{x['mean']:.4f} ({', '.join(f'{k} {v:.3f}' for k, v in x['dice'].items())}) | "
                             f"{x['passes'] * r['overlaps'][o]['seconds_per_pass']:.1f}")
            lines.append(f"| {name} | {s['passes']} | " + " | ".join(cells) + " |")
        lines += ["", f"Holds: {r['holds']}.", ""]
    return "\n".join(lines)


def main() -> None:
    args = task_parser(__doc__.splitlines()[0], "tta").parse_args()
    ckpt, root, cases, split = unseen(args)
    print(f"{args.task}: {ckpt}, {len(cases)} cases")
    r = measure(ckpt, cases, root)
    r |= {"model": str(ckpt), "split": split, "machine": machine()}
    r["holds"] = cheapest(r)
    path = args.results / "tta.json"
    rows = json.loads(path.read_text()) if path.is_file() else {}
    rows[args.task] = r
    print(page({args.task: r}))
    print(f"wrote {write('tta', rows, page(rows), args.results)}")


if __name__ == "__main__":
    main()
