"""experiment=auto on the real tasks of ../shared/data, one command each, no per-task tuning: the recipe's k-fold
cross-validation, scored as `make cv` scores it (each fold's final model on its own validation cases), or where a task
holds a test split its final model there, by pipeline.evaluate per class (Dice, HD95, NSD), with the minutes and the
machine, into docs/results/auto.md and .json.

    .venv/bin/python bench/auto.py ibsr                     # the IBSR18 brains: 5 folds of 30 minutes
    .venv/bin/python bench/auto.py ibsr --folds 0           # one of them
    .venv/bin/python bench/auto.py acdc                     # ACDC cine MRI: 5 folds of whole patients
    .venv/bin/python bench/auto.py brats --minutes 10       # BRATS subset: 4 folds (leave one out), tumour regions
    .venv/bin/python bench/auto.py hippocampus              # experiment=hippocampus: its test split, mirror TTA
    .venv/bin/python bench/auto.py ct --minutes 5           # TotalSegmentator's CTs: the final model, a DICOM-SEG
    .venv/bin/python bench/auto.py acdc --ensemble --minutes 5   # 5 folds of 5 min against one 25-min final model

--ensemble compares nnU-Net's way of predicting (the ensemble of the k fold models) with the single final model
trained on every case for as many minutes as the k folds together, both scored with mirror TTA on the same held-out
test cases (a grouped 20% held out for it where the recipe holds none), into docs/results/ensemble.{md,json}.

A fold whose run folder holds a finished last.pt is not trained again, and a stopped one goes on from it, so that
`--folds 0` one day and `--folds 1 2 3 4` another make one cross-validation; the table scores every fold present.
"""

import argparse
import csv
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline import project_root
from pipeline.core import hardware
from pipeline.core.config import compose
from pipeline.core.rundir import RunDir
from pipeline.evaluation.scoring import evaluate
from pipeline.inference.predictor import infer
from pipeline.models import checkpoint
from pipeline.training.run import train

from common import RESULTS, machine, machine_line, shared_data, write
from convert import BRATS_REGIONS, brats_as_msd, totalseg_as_folders


@dataclass
class Task:
    data: str  # the folder in ../shared/data
    folds: int = 5  # 0: the final model alone (data.fold=all)
    experiment: str = "auto"  # the recipe (one built on auto by a few overrides, each with its measured reason)
    scored: str = "cv"  # cv: each fold on its own cases | test: the held-out test split, mirror TTA | train: its cases
    convert: object = None  # source folder, target folder -> an MSD dataset
    regions: dict = field(default_factory=dict)  # scored besides the classes
    overrides: list = field(default_factory=list)  # what the data forces (never a tuned setting)
    dicom: tuple = ()  # (a DICOM series, its label map) in the task's folder: predicted as a DICOM-SEG and scored
    # an estimate (real labels, enough cases): in the README's table; else a path check, on the results page and in
    # docs/auto.md only (BRATS's 4 cases, CT labels made by a model)
    estimate: bool = True


TASKS = {
    "ibsr": Task("ibsr18_brain_tissue"),
    # 80 patients, two cine frames each: 5 folds of whole patients (experiment=auto groups them by case name)
    "acdc": Task("acdc_cardiac"),
    # 260 cases, so a test split of 31 is held out: the final model scored there as its recipe says (docs/hippocampus)
    "hippocampus": Task("msd_hippocampus", folds=0, experiment="hippocampus", scored="test"),
    # four cases: leave-one-out; labels 1-4 scored as the challenge's regions as well
    "brats": Task("brats2015_subset", folds=4, convert=brats_as_msd, regions=BRATS_REGIONS,
                  overrides=["data.split.folds=4"], estimate=False),
    # two CTs whose labels are TotalSegmentator's: too few to hold one out, and no ground truth. The final model (fold
    # all) is scored on its training cases (what a short run learns), then predicts the DICOM series it never saw
    # (rescaled to HU by the reader) into a DICOM-SEG, scored against TotalSegmentator's map of it: agreement only.
    "ct": Task("totalseg_ct_examples", folds=0, scored="train", convert=totalseg_as_folders,
               dicom=("ct_dicom", "example_seg_dicom.nii.gz"), estimate=False),
}


def finished(run: RunDir) -> dict | None:
    """A fold's last.pt when its run ended (its last epoch is the one its schedule ended at), else None."""
    if not run.last.is_file():
        return None
    last = checkpoint.load(run.last)
    return last if last["epoch"] >= last.get("end_epoch", last["epoch"]) else None


def train_fold(task: Task, root: Path, k: int | str, minutes: float | None, out: Path, extra: list[str]) -> None:
    """Fold k (or all) of the recipe in out/<k>, unless it finished there before (a stopped one goes on from its
    last.pt). minutes: the budget, None for the recipe's own."""
    run = RunDir(out / str(k))
    if finished(run):
        return
    start = time.perf_counter()
    budget = [] if minutes is None else [f"trainer.max_minutes={minutes}"]
    train(compose("train", [f"experiment={task.experiment}", f"data.root={root}", f"data.fold={k}", "tracking=none",
                            *budget, "resume=auto", *task.overrides, *extra, f"paths.run_dir={run.root}"]))
    print(f"fold {k}: {(time.perf_counter() - start) / 60:.1f} min with data loading")


def record(last: dict, fold: int | str) -> dict:
    """What a finished fold's last.pt says of its run."""
    return {"fold": fold, "epochs": last["epoch"], "run_minutes": last.get("run_minutes", last["train_minutes"]),
            "precision": last["precision"]["amp"], "budget_minutes": last["config"]["trainer"]["max_minutes"]}


def row(name: str, task: Task, folds: list[dict], summary: dict) -> dict:
    classes = summary["classes"]
    return {
        "task": name, "data": task.data, "experiment": task.experiment, "scored": task.scored,
        "folds": [f["fold"] for f in folds], "of_folds": task.folds,
        "cases_scored": summary["cases"], "budget_minutes": folds[0]["budget_minutes"],
        "run_minutes": [round(f["run_minutes"], 2) for f in folds], "epochs": [f["epochs"] for f in folds],
        "precision": folds[0]["precision"],
        "dice": {c: round(m["dice"]["mean"], 4) for c, m in classes.items()},
        "hd95_mm": {c: round(m["hd95_mm"]["mean"], 2) for c, m in classes.items()},
        "nsd": {c: round(m["nsd"]["mean"], 4) for c, m in classes.items()},
        "mean": {m: round(summary["mean"][m], 4) for m in ("dice", "hd95_mm", "nsd")},
        "regions": {r: {m: round(s[m]["mean"], 4) for m in ("dice", "hd95_mm", "nsd")}
                    for r, s in summary.get("regions", {}).items()},
        "machine": machine(),
    }


def present(scores: Path) -> list[str]:
    """The classes an evaluation's truth holds (its per_case.csv): a class absent from truth and prediction scores
    Dice 1, which says nothing of what was learned."""
    with open(scores / "per_case.csv") as f:
        return sorted({r["class"] for r in csv.DictReader(f) if r["truth_ml"] and float(r["truth_ml"]) > 0})


def learned(dice: dict, classes: list[str], at: float = 0.5) -> str:
    """For many classes: how many of those in the truth reach a mean Dice of `at`."""
    return f"{sum(dice[c] >= at for c in classes)} of the {len(classes)} classes present at Dice >= {at}"


def dicom_seg(ckpt: Path, series: Path, truth: Path, out: Path) -> dict:
    """The series predicted as pipeline.infer does with format=dicom-seg, the DICOM-SEG's segments counted, and the
    label map scored against `truth`."""
    import pydicom
    import SimpleITK as sitk

    report = infer(ckpt, series, out / "pred", format="dicom-seg", overwrite=True)
    if report["failed"]:
        raise SystemExit(f"{series}: {report['failed']}")
    pred = report["written"][0]
    seg = pydicom.dcmread(next((out / "pred").glob("*.seg.dcm")))
    image = sitk.GetArrayFromImage(sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series))))
    found = np.unique(nib.load(pred).dataobj)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(truth, out / "truth" / pred.name)  # scored by case name: the truth under the prediction's
    summary = evaluate(compose("evaluate", [f"pred={out / 'pred'}", f"truth={out / 'truth'}", "tracking=none",
                                            "overlays=0", "check_postprocessing=false", f"output={out / 'scores'}",
                                            f"paths.run_dir={out / 'scores'}"]))
    dice, classes = {c: m["dice"]["mean"] for c, m in summary["classes"].items()}, present(out / "scores")
    return {"series": series.name, "hu_range": [int(image.min()), int(image.max())],
            "classes_found": int((found > 0).sum()), "segments": len(seg.SegmentSequence),
            "truth_classes": len(classes), "mean_dice_present": round(float(np.mean([dice[c] for c in classes])), 4),
            "learned": learned(dice, classes)}


def markdown(rows: dict) -> str:
    """The results page: one section per task, classes and regions as rows."""
    lines = ["# experiment=auto on real tasks", "",
             "Written by `bench/auto.py` (do not edit by hand): the recipe's cross-validation, each fold's final model "
             "scored on its own validation cases by `pipeline.evaluate`, or, where the task holds a test split, the "
             "final model (every non-test case) on it; the minutes are each run's (training, validation and "
             "checkpoints), data loading excluded. A task with too few cases for folds (`all`) is scored on its "
             "training cases: what the run learned, not an estimate.", ""]
    for r in rows.values():
        m = r["machine"]
        lines += [f"## {r['task']} ({r['data']})", "",
                  f"`experiment={r.get('experiment', 'auto')}`. {SCORED[scored_as(r)](r)}; "
                  f"budget {r['budget_minutes']} min a run, ran {', '.join(map(str, r['run_minutes']))} min, "
                  f"{', '.join(map(str, r['epochs']))} epochs, {r['precision']}. {machine_line(m)}", "",
                  "| structure | Dice | HD95 mm | NSD (1 mm) |", "| --- | --- | --- | --- |"]
        if len(r["dice"]) <= MANY:
            lines += [f"| {c} | {r['dice'][c]:.4f} | {r['hd95_mm'][c]:.2f} | {r['nsd'][c]:.4f} |" for c in r["dice"]]
        else:
            lines.append(f"| {len(r['dice'])} classes: {learned(r['dice'], r['present'])}; mean Dice over those "
                         f"{np.mean([r['dice'][c] for c in r['present']]):.4f} | | | |")
        lines.append(f"| **mean** | **{r['mean']['dice']:.4f}** | {r['mean']['hd95_mm']:.2f} | "
                     f"{r['mean']['nsd']:.4f} |")
        lines += [f"| region {g} | {s['dice']:.4f} | {s['hd95_mm']:.2f} | {s['nsd']:.4f} |"
                  for g, s in r["regions"].items()]
        if d := r.get("dicom"):
            lines += ["", f"DICOM series `{d['series']}` (HU {d['hu_range'][0]} to {d['hu_range'][1]} as read): "
                      f"{d['classes_found']} classes found, a DICOM-SEG of {d['segments']} segments; against "
                      f"TotalSegmentator's map of it ({d['truth_classes']} classes) mean Dice "
                      f"{d['mean_dice_present']:.4f} over those, {d['learned']}."]
        lines.append("")
    return "\n".join(lines)


SCORED = {  # what a row's scores are of, by Task.scored
    "cv": lambda r: f"Folds {', '.join(map(str, r['folds']))} of {r['of_folds']}, {r['cases_scored']} cases scored",
    "test": lambda r: f"The final model (`data.fold=all`) on the {r['cases_scored']} held-out test cases, mirror TTA",
    "train": lambda r: f"The final model (`data.fold=all`) on its {r['cases_scored']} training cases",
}
def scored_as(r: dict) -> str:
    return r.get("scored", "cv" if r["of_folds"] else "train")  # rows written before Task.scored


SPLIT = {"cv": lambda r: f"folds {','.join(map(str, r['folds']))} of {r['of_folds']}",
         "test": lambda r: "test split (TTA)", "train": lambda r: "none (all)"}
MANY = 12  # more classes than this: a count of those learned instead of a row each
README = project_root() / "README.md"
MARKS = ("<!-- bench/auto.py writes this table -->", "<!-- end of bench/auto.py's table -->")


def readme_table(rows: dict) -> str:
    """The README's summary: a line per task that estimates anything (its page in docs/results has every metric, and
    the path checks too)."""
    lines = ["| task | scored on | minutes a run | CPU class (precision) | mean Dice | Dice per class |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in (r for name, r in rows.items() if name not in TASKS or TASKS[name].estimate):
        cpu = r["machine"]["cpu"].split(": ", 1)[-1]  # the instruction sets, not the model name
        many = len(r["dice"]) > MANY  # the mean over the classes present: an absent class scores 1
        per_class = learned(r["dice"], r["present"]) if many else \
            ", ".join(f"{c} {d:.3f}" for c, d in r["dice"].items())
        mean = np.mean([r["dice"][c] for c in r["present"]]) if many else r["mean"]["dice"]
        per_class += "".join(f"; {g} {v['dice']:.3f}" for g, v in r["regions"].items())
        split = SPLIT[scored_as(r)](r)
        recipe = r.get("experiment", "auto")
        task = r["task"] if recipe == "auto" else f"{r['task']} (`experiment={recipe}`)"
        lines.append(f"| {task} | {split}, "
                     f"{r['cases_scored']} cases | {r['budget_minutes']:g} | {cpu} ({r['precision']}) | "
                     f"{mean:.3f} | {per_class} |")
    return "\n".join(lines)


def write_readme(rows: dict, path: Path = README) -> None:
    """Replace the table between the README's two marks."""
    text = path.read_text()
    start, end = text.index(MARKS[0]) + len(MARKS[0]), text.index(MARKS[1])
    path.write_text(f"{text[:start]}\n{readme_table(rows)}\n{text[end:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--folds", type=int, nargs="+", help="which folds to train (default: every one)")
    parser.add_argument("--minutes", type=float, help="each fold's budget (default: the recipe's trainer.max_minutes)")
    parser.add_argument("--data", type=Path, help="the task's data (default: its folder in ../shared/data)")
    parser.add_argument("--set", nargs="+", default=[], metavar="OVERRIDE", help="training overrides (levers)")
    parser.add_argument("--out", type=Path, default=project_root() / "outputs" / "bench" / "auto")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where auto.json and auto.md go")
    parser.add_argument("--ensemble", action="store_true", help="the folds' ensemble against the final model at "
                                                                    "equal total minutes (docs/results/ensemble.md)")
    parser.add_argument("--pages-only", action="store_true", help="only rewrite auto.md and the README's table from "
                                                                      "auto.json (no training, no scoring)")
    parser.add_argument("--readme", type=Path, help="whose table between the marks it rewrites (default: the "
                                                     "project's README, with the default --results only)")
    args = parser.parse_args()
    if args.pages_only:
        if (ensembles := args.results / "ensemble.json").is_file():
            rows = json.loads(ensembles.read_text())
            write("ensemble", rows, ensemble_page(rows), args.results)
        rows = json.loads((args.results / "auto.json").read_text())
        return publish(rows, args)
    task = TASKS[args.task]
    out = args.out / args.task
    source = root = args.data or shared_data() / task.data
    if task.convert is not None:
        root = task.convert(source, out / "dataset")
    print(f"CPU: {hardware.cpu_class()}")
    if args.ensemble:
        return ensemble(args.task, task, root, args.minutes or 30, out / "ensemble", args.set, args.results)
    for k in args.folds if args.folds is not None else range(task.folds) if task.folds else ["all"]:
        train_fold(task, root, k, args.minutes, out / "folds", args.set)
    folds = [record(last, int(n) if (n := run.root.name).isdigit() else n)
             for run in RunDir.runs_in(out / "folds") if (last := finished(run))]
    regions = "{" + ",".join(f"{r}:[{','.join(map(str, v))}]" for r, v in task.regions.items()) + "}" \
        if task.regions else "null"
    final = f"ckpt={RunDir(out / 'folds' / 'all').last}"
    scored = {"cv": [f"ckpt={out / 'folds'}", "split=cv"], "test": [final, "split=test", "tta=true"],
              "train": [final, "split=train", "check_postprocessing=false"]}[task.scored]
    summary = evaluate(compose("evaluate", [*scored, "tracking=none", f"output={out / 'cv'}",
                                            f"paths.run_dir={out / 'cv'}", f"regions={regions}"]))
    path = args.results / "auto.json"
    rows = json.loads(path.read_text()) if path.is_file() else {}
    rows[args.task] = row(args.task, task, folds, summary) | {"present": present(out / "cv")}
    if task.dicom:
        series, truth = (source / f for f in task.dicom)
        rows[args.task]["dicom"] = dicom_seg(RunDir(out / "folds" / "all").last, series, truth, out / "dicom")
    publish(rows, args)
    print(markdown({args.task: rows[args.task]}))


def ensemble(name: str, task: Task, root: Path, minutes: float, out: Path, extra: list[str], results: Path) -> None:
    """The k folds' ensemble against the final model at equal total minutes, on the same held-out test cases."""
    held = [] if task.scored == "test" else ["data.split.test=0.2"]  # every model holds the same cases out
    k = task.folds or 5
    for fold in range(k):
        train_fold(task, root, fold, minutes, out / "folds", [*held, *extra])
    train_fold(task, root, "all", minutes * k, out / "final", [*held, *extra])
    scores = {}
    for model, ckpt in (("ensemble", out / "folds"), ("final", RunDir(out / "final" / "all").last)):
        summary = evaluate(compose("evaluate", [f"ckpt={ckpt}", "split=test", "tta=true", "tracking=none",
                                                f"output={out / model}", f"paths.run_dir={out / model}"]))
        scores[model] = {"cases": summary["cases"], "mean": round(summary["mean"]["dice"], 4),
                         "dice": {c: round(m["dice"]["mean"], 4) for c, m in summary["classes"].items()}}
    path = results / "ensemble.json"
    rows = json.loads(path.read_text()) if path.is_file() else {}
    rows[name] = {"task": name, "folds": k, "fold_minutes": minutes, "final_minutes": minutes * k,
                  "held_out": "the recipe's test split" if not held else "20% of the subjects", **scores,
                  "machine": machine()}
    print(f"wrote {write('ensemble', rows, ensemble_page(rows), results)}")


def ensemble_page(rows: dict) -> str:
    """docs/results/ensemble.md: a row per task."""
    lines = ["# The folds' ensemble against the final model", "",
             "Written by `bench/auto.py --ensemble` (do not edit by hand): the k fold models of `make cv` predicting "
             "together (`make infer ckpt=outputs/cv/<time>`) against the one model trained on every case for as many "
             "minutes as the k folds together, both with mirror TTA, scored on the same held-out test cases.", "",
             "| task | held out | cases | ensemble: k x minutes, mean Dice (per class) | final: minutes, mean Dice "
             "(per class) | CPU class, threads |", "| --- | --- | --- | --- | --- | --- |"]

    def scored(s: dict) -> str:
        return f"{s['mean']:.4f} ({', '.join(f'{c} {v:.3f}' for c, v in s['dice'].items())})"

    for r in rows.values():
        lines.append(f"| {r['task']} | {r['held_out']} | {r['ensemble']['cases']} | {r['folds']} x "
                     f"{r['fold_minutes']:g}: {scored(r['ensemble'])} | {r['final_minutes']:g}: {scored(r['final'])} "
                     f"| {r['machine']['cpu'].split(': ', 1)[-1]}, {r['machine']['threads']} threads |")
    lines += ["", *sorted({machine_line(r["machine"]) for r in rows.values()})]
    return "\n".join(lines)


def publish(rows: dict, args: argparse.Namespace) -> None:
    """docs/results/auto.{md,json} and the README's table."""
    write("auto", rows, markdown(rows), args.results)
    if readme := args.readme or (README if args.results == RESULTS else None):
        write_readme(rows, readme)


if __name__ == "__main__":
    main()
