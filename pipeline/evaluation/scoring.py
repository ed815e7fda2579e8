"""Evaluation as a library (pipeline.evaluate runs it): score label maps against ground truth, per case and class.

    python -m pipeline.evaluate pred=<folder> truth=<folder or dataset.json>   # predictions already made
    python -m pipeline.evaluate ckpt=<best.pt> split=test   # predict a split of the checkpoint's data first

Writes per_case.csv, summary.json, overlay PNGs, report.html and (optionally) postprocessing.json and comparison.json
into `output`, prints a table, and logs everything to MLflow: into the run that trained the checkpoint when it is
known, else into a new evaluation run. Metrics and the handling of empty structures: pipeline/evaluation/metrics.py.
"""

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from hydra.utils import instantiate
from monai.metrics import compute_dice
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from pipeline.core.errors import InputError
from pipeline.core.files import atomic
from pipeline.core.rundir import RunDir
from pipeline.data.fingerprint import files_key, profile
from pipeline.data.io import NIFTI, SITK, Volume, in_ras, label_fault, ras_spacing, read_array
from pipeline.data.sources import case_id, read_dataset, read_msd
from pipeline.evaluation import plots, report
from pipeline.evaluation.metrics import METRICS, case_scores, paired_difference, summarize
from pipeline.inference.predictor import PredictOptions, checkpoints, infer, postprocess
from pipeline.models import checkpoint
from pipeline.tracking.runs import VolumeDataset

log = logging.getLogger(__name__)

PER_CASE = "per_case.csv"  # the per-case table this writes and compare= reads back
PRINTED = ("dice", "iou", "hd95_mm", "assd_mm", "nsd", "precision", "recall", "diff_ml")


@dataclass
class Case:
    id: str
    pred: Path
    truth: Path
    image: Path | None = None


def label_files(folder: Path) -> dict[str, Path]:
    """case id -> label map file in a folder (NIfTI, NRRD, MHA); inference's extra outputs are not label maps."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.endswith(NIFTI + SITK) and not p.name.startswith("."):
            stem = Volume(p).stem
            if not stem.endswith(("_uncertainty", "_probabilities")):
                files[stem] = p
    return files


def dataset_pairs(spec: Path) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """case id -> (label, image) and the class names of an MSD dataset.json."""
    dataset = read_msd(spec.parent)
    names = [dataset.labels[i] for i in range(len(dataset.labels))]
    return {case_id(c): (Path(c["label"]), Path(c["image"])) for c in dataset.cases}, names


def match(pred: Path, truth: Path, images: Path | None) -> tuple[list[Case], list[str] | None]:
    """Pair every prediction with its ground truth (and image, when known) by case id."""
    if not pred.is_dir():
        raise InputError(f"{pred}: pred must be a folder of label maps")
    predicted = label_files(pred)
    if not predicted:
        raise InputError(f"{pred}: holds no NIfTI, NRRD or MHA label maps")
    names = None
    if truth.is_file() and truth.name.endswith(".json"):
        known, names = dataset_pairs(truth)
    elif truth.is_dir():
        known = {cid: (p, None) for cid, p in label_files(truth).items()}
    else:
        raise InputError(f"{truth}: truth must be a folder of label maps or an MSD dataset.json")
    if images is not None and not Path(images).is_dir():
        raise InputError(f"{images}: images must be a folder")
    if images is None and truth.is_dir():  # MSD's and nnU-Net's layout: labelsTr/ beside imagesTr/
        beside = truth.with_name(truth.name.replace("labels", "images"))
        images = beside if beside != truth and beside.is_dir() else None
    image_files = {}
    if images is not None:  # <case>.nii.gz, or nnU-Net's first channel <case>_0000.nii.gz
        image_files = {v.stem.removesuffix("_0000"): v.channels[0] if v.channels else v.path for v in
                       (Volume(p) for p in sorted(Path(images).iterdir()) if p.name.endswith(NIFTI + SITK))}
    cases = []
    for cid, p in predicted.items():
        if cid not in known:
            raise InputError(f"{p}: no ground truth for case {cid} in {truth}")
        label, image = known[cid]
        cases.append(Case(cid, p, label, image_files.get(cid, image)))
    return cases, names


def recorded_split(member: Path, *names: str) -> list[list[str]]:
    """The case ids of each split in `names` as the member's run recorded them (splits.json beside checkpoints/, read
    once): the record decides, and it survives a changed seed."""
    run = RunDir.of(member)
    splits_file = run.splits
    if not splits_file.is_file():
        raise InputError(f"{splits_file}: not found; "
                         "split= needs the splits.json that training writes beside checkpoints/")
    recorded = run.recorded_splits()
    if missing := next((name for name in names if not recorded.get(name)), None):
        raise InputError(f"{splits_file}: split {missing!r} is missing or empty (have: {', '.join(recorded)})")
    return [recorded[name] for name in names]


def predicted_groups(members: list[Path], split_name: str) -> list[tuple[list[Path], list[str]]]:
    """Which checkpoints predict which cases. A split of a dataset: all members together (an ensemble, e.g. the k folds
    on the test split, which every member must hold out). split=cv: each fold alone on the cases it validated on, so
    that the k folds together predict every non-test case once (nnU-Net's cross-validation)."""
    if split_name != "cv":
        [ids] = recorded_split(members[0], split_name)
        for member in members[1:]:
            if recorded_split(member, split_name) != [ids]:
                raise InputError(f"{RunDir.of(member).splits}: its {split_name} split differs from "
                                 f"{RunDir.of(members[0]).splits}'s; an ensemble is scored on cases every member held "
                                 "out (split=test for the k folds; split=cv scores each fold on its own val split)")
        return [(members, ids)]
    groups, validated_by, first_test = [], {}, None
    for member in members:
        splits_file = RunDir.of(member).splits
        [ids] = recorded_split(member, "val")
        test = RunDir.of(member).recorded_splits().get("test", [])  # none where a small dataset kept none back
        first_test = first_test or test
        if test != first_test:
            raise InputError(f"{splits_file}: its test split differs from {RunDir.of(members[0]).splits}'s; "
                             "split=cv takes the folds of one cross-validation")
        if shared := next((i for i in ids if i in validated_by), None):
            raise InputError(f"{splits_file}: validates case {shared}, as {validated_by[shared]} does; "
                             "split=cv takes each fold of one cross-validation once")
        validated_by |= {i: splits_file for i in ids}
        groups.append(([member], ids))
    return groups


def split_cases(members: list[Path], split_name: str, out_dir: Path, cfg: DictConfig) -> tuple[list[Case], dict]:
    """Predict one split of a checkpoint's dataset (or, split=cv, each fold's validation cases) into
    out_dir/predictions; the cases and the checkpoint. Several members' scores go to a new MLflow run rather than to
    one member's."""
    bundle = checkpoint.load(members[0])
    if "data" not in bundle["config"]:  # e.g. saved by hand or by an older pipeline: its dataset is unknown
        raise InputError(f"{members[0]}: its config names no dataset, so split={split_name} cannot be predicted "
                         "(score label maps with pred= truth= instead)")
    data = OmegaConf.create(bundle["config"]).data
    by_id = {case_id(c): c for c in read_dataset(data).cases}
    groups = predicted_groups(members, split_name)
    if len(members) > 1:
        bundle = bundle | {"run_id": None}
    for group, ids in groups:
        if missing := next((i for i in ids if i not in by_id), None):
            raise InputError(f"{data.root}: case {missing} of {RunDir.of(group[0]).splits} is not in the dataset "
                             "any more")
    predictions, options, cases = out_dir / "predictions", PredictOptions.from_config(cfg), []
    for group, ids in groups:
        chosen = [by_id[i] for i in ids]
        result = infer(group, [c["image"] for c in chosen], predictions, options, overwrite=True)
        if result["failed"]:
            raise InputError(next(iter(result["failed"].values())))
        cases += chosen
    # inference names each prediction after its image (an nnU-Net image's _0000 included)
    return [Case(case_id(c), predictions / Volume(Path(c["image"])).output_name("nifti"), Path(c["label"]),
                 Path(c["image"])) for c in cases], bundle


def same_grid(a: np.ndarray, a_affine: np.ndarray, b: np.ndarray, b_affine: np.ndarray) -> bool:
    return a.shape == b.shape and np.allclose(a_affine, b_affine, atol=1e-3)


def canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """io.in_ras(array, affine) with its affine (nibabel's as_closest_canonical)."""
    ornt = nib.orientations.io_orientation(affine)
    return in_ras(array, affine), affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)


def load_pair(case: Case, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prediction, truth, affine) on one grid, or an InputError naming the file."""
    pred, pred_affine = read_array(case.pred)
    truth, affine = read_array(case.truth)
    if not same_grid(pred, pred_affine, truth, affine):
        # the same voxels stored in another axis order or direction (a label map written LAS, its image LPS):
        # compared in the closest canonical (RAS) order, as MONAI's Orientationd would put both
        (pred, pred_affine), (truth, affine) = canonical(pred, pred_affine), canonical(truth, affine)
        if not same_grid(pred, pred_affine, truth, affine):
            raise InputError(f"{case.pred}: grid {pred.shape} differs from the ground truth's {truth.shape} "
                             f"({case.truth}) in shape or affine; predict on the truth's grid")
    for path, labels in ((case.pred, pred), (case.truth, truth)):
        if fault := label_fault(path, labels, num_classes):
            raise InputError(fault)
    return pred.astype(np.int16), truth.astype(np.int16), affine


POSTPROCESSING = ("largest_component", "fill_holes")


def postprocessing_dice(pred: np.ndarray, truth: np.ndarray, class_names: list[str]) -> dict[int, dict[str, float]]:
    """One case's Dice per foreground class as predicted ("none") and after each post-processing option alone."""
    def dice(p, c):  # one class: both empty -> 1, one empty -> 0, as in the report
        return float(compute_dice(torch.as_tensor(p == c)[None, None], torch.as_tensor(truth == c)[None, None],
                                  include_background=True, ignore_empty=False)[0, 0])

    k = len(class_names)
    return {c: {"none": dice(pred, c)} | {o: dice(postprocess(pred, **{o: [c]}, num_classes=k), c)
                                          for o in POSTPROCESSING}
            for c in range(1, k)}


def postprocessing_advice(per_case: list[dict], class_names: list[str]) -> dict:
    """nnU-Net's question on validation cases: does keeping a class's largest component, or filling its holes, raise
    that class's mean Dice? The options that do become `pipeline.infer` overrides."""
    means = {c: {o: float(np.mean([d[c][o] for d in per_case])) for o in ("none", *POSTPROCESSING)}
             for c in range(1, len(class_names))}
    recommended = {o: [c for c, m in means.items() if m[o] > m["none"] + 1e-4] for o in POSTPROCESSING}
    overrides = " ".join(f"postprocess.{o}=[{','.join(map(str, cs))}]" for o, cs in recommended.items() if cs)
    return {"mean_dice": {class_names[c]: m for c, m in means.items()}, "recommended": recommended,
            "infer_overrides": overrides}


def write_csv(rows: list[dict], path: Path) -> Path:
    columns = ["case", "class", *METRICS, "empty"]
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if isinstance(r[k], float) and np.isnan(r[k]) else r[k] for k in columns})
    return path


COMPARED = {"dice": "Dice", "nsd": "NSD", "hd95_mm": "HD95 mm"}  # compare=: the metrics paired, as printed


def scored(path: Path) -> tuple[Path, list[dict]]:
    """The rows (case, class and the COMPARED metrics) of an earlier evaluation: its folder or its per_case.csv."""
    path = path / PER_CASE if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"{path}: not found; compare= takes an evaluation's folder or its per_case.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return path, [{"case": r["case"], "class": r["class"]} | {m: float(r[m]) for m in COMPARED} for r in rows]
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: not a per_case.csv of pipeline.evaluate (needs case, class, "
                         f"{', '.join(COMPARED)} in every row)") from err


def case_means(rows: list[dict], metric: str = "dice", class_name: str | None = None) -> dict[str, float]:
    """case -> one metric: the mean over classes (what the summary's mean averages and the overlays rank by), or one
    class's."""
    by_case = {}
    for r in rows:
        if class_name in (None, r["class"]):
            by_case.setdefault(r["case"], []).append(r[metric])
    return {case: float(np.mean(values)) for case, values in by_case.items()}


def compared(rows: list[dict], path: Path, earlier: list[dict], class_names: list[str]) -> dict:
    """This evaluation's Dice, NSD and HD95 minus an earlier one's on the same cases, per case and per class, with
    paired_difference's interval and test."""
    ours, theirs = ({(r["case"], r["class"]) for r in rs} for rs in (rows, earlier))
    if ours != theirs:
        extra, missing = sorted(theirs - ours), sorted(ours - theirs)
        what = (f"scores case {extra[0][0]} ({extra[0][1]}), which this evaluation does not" if extra
                else f"has no score for case {missing[0][0]} ({missing[0][1]})")
        raise InputError(f"{path}: {what}; a paired comparison takes the same cases and classes")
    return {"against": str(path.resolve()),
            **{m: {"mean": paired_difference(case_means(rows, m), case_means(earlier, m)),
                   "classes": {n: paired_difference(case_means(rows, m, n), case_means(earlier, m, n))
                               for n in class_names[1:]}}
               for m in COMPARED}}


def difference_text(d: dict) -> str:
    """One paired_difference as printed: the difference, its interval, the cases that rose and fell, the test."""
    return (f"{d['difference']:+.4f} (95% paired bootstrap {d['ci95'][0]:+.4f}..{d['ci95'][1]:+.4f}, {d['cases']} "
            f"cases; higher in {d['higher']}, lower in {d['lower']}; Wilcoxon p {d['wilcoxon_p']:.3g})")


def table(summary: dict) -> str:
    """Per-class means of the main metrics, one line per class."""
    lines = [f"{'class':14s}" + "".join(f"{m:>10s}" for m in PRINTED)]
    rows = [*summary["classes"].items(), ("mean", {m: {"mean": v} for m, v in summary["mean"].items()}),
            *((f"region {name}", metrics) for name, metrics in summary.get("regions", {}).items())]
    for name, metrics in rows:
        cells = ("" if metrics[m]["mean"] is None else f"{metrics[m]['mean']:.4f}" for m in PRINTED)
        lines.append(f"{name:14s}" + "".join(f"{c:>10s}" for c in cells))
    return "\n".join(lines)


def evaluate(cfg: DictConfig) -> dict:
    """Score, write files, log; returns the summary."""
    out_dir = Path(cfg.output)
    against = earlier_evaluation(cfg, out_dir)
    # one, or an ensemble (a list, a folder, the k folds)
    # split=cv scores each fold's final model (last.pt): its best.pt was picked on the very cases cv scores
    members = checkpoints(cfg.ckpt, final=cfg.split == "cv") if cfg.ckpt is not None else []
    if members and cfg.get("if_empty") == "skip" and RunDir.of(members[0]).recorded_splits().get(cfg.split) == []:
        log.info(f"{RunDir.of(members[0]).splits}: the {cfg.split} split holds no cases (a small dataset keeps no test "
                 "split; its cross-validation is the estimate): nothing to score")
        return {}
    cases, class_names, source, bundle = gather(cfg, members, out_dir)
    regions = {str(name): list(labels) for name, labels in (cfg.get("regions") or {}).items()}
    rows, region_rows, post = score(cases, class_names, regions, cfg)
    comparison = compared(rows, *against, class_names) if against else None
    if comparison:
        source["compared with"] = f"{comparison['against']}: " + "; ".join(
            f"mean {label} {difference_text(comparison[m]['mean'])}" for m, label in COMPARED.items())
    summary = summarize(rows, class_names) | {"cases": len(cases), "tolerance_mm": cfg.nsd_tolerance_mm,
                                              "source": source}
    if regions:
        summary |= {"regions": summarize(region_rows, ["background", *regions])["classes"], "region_labels": regions}
    files = write_scores(out_dir, rows + region_rows, summary, comparison,
                         postprocessing_advice(post, class_names) if cfg.check_postprocessing else None)
    overlays = draw_overlays(cases, rows, class_names, cfg, out_dir)
    files += [png for png, _ in overlays.values()]
    curves = RunDir.of(members[0]).curves if len(members) == 1 else None
    files.append(report.write(out_dir / "report.html", rows, summary, source, overlays,
                              curves if curves and curves.is_file() else None))
    log_summary(summary, comparison, len(cases), out_dir)
    log_to_tracking(cfg, summary, files, cases, bundle)
    return summary


def earlier_evaluation(cfg: DictConfig, out_dir: Path) -> tuple | None:
    """compare=: the earlier evaluation's per-case scores, which this one must not overwrite."""
    against = scored(Path(cfg.compare)) if cfg.get("compare") else None
    if against and against[0].resolve() == (out_dir / PER_CASE).resolve():
        raise InputError(f"{against[0]}: this evaluation would overwrite it (output={out_dir}); compare= takes an "
                         "earlier evaluation's folder, not this one's")
    return against


def gather(cfg: DictConfig, members: list[Path], out_dir: Path) -> tuple[list, list[str], dict, dict | None]:
    """(cases, class names, where they came from, the checkpoint's bundle or None): a checkpoint's split predicted
    first, or folders of label maps paired by case id."""
    bundle, class_names = None, None
    if members:
        cases, bundle = split_cases(members, cfg.split, out_dir, cfg)
        class_names = list(bundle["config"]["data"]["class_names"])
        source = {"name": f"{bundle['config']['data']['name']} {cfg.split} split", "split": cfg.split,
                  "ckpt": ", ".join(str(p.resolve()) for p in members)}
    elif cfg.pred is not None and cfg.truth is not None:
        cases, class_names = match(Path(cfg.pred), Path(cfg.truth), cfg.get("images"))
        source = {"name": Path(cfg.pred).resolve().name, "pred": str(Path(cfg.pred).resolve()),
                  "truth": str(Path(cfg.truth).resolve())}
    else:
        raise InputError("evaluate needs pred=<folder> with truth=<folder or dataset.json>, "
                         "or ckpt=<checkpoint> with split=")
    if cfg.class_names:
        class_names = list(cfg.class_names)
    if class_names is None:  # plain folders: classes 0..max label
        top = max(int(read_array(c.truth)[0].max()) for c in cases)
        class_names = ["background", *(f"class{i}" for i in range(1, max(top, 1) + 1))]
    unknown = [c for c in cfg.cases if c not in {case.id for case in cases}]
    if unknown:
        raise InputError(f"cases={unknown}: not among the evaluated cases")
    source |= {"cases": len(cases), "classes": class_names[1:], "nsd_tolerance_mm": cfg.nsd_tolerance_mm}
    return cases, class_names, source, bundle


def score(cases: list, class_names: list[str], regions: dict, cfg: DictConfig) -> tuple[list, list, list]:
    """Per case: each class's scores, each region's (a set of labels, e.g. BRATS's whole tumour, as one structure),
    and the post-processing options' Dice; one case in memory at a time."""
    rows, region_rows, post = [], [], []
    for case in tqdm(cases, desc="evaluate", unit="case"):
        pred, truth, affine = load_pair(case, len(class_names))
        spacing = nib.affines.voxel_sizes(affine)
        rows += [{"case": case.id} | r for r in case_scores(pred, truth, spacing, class_names, cfg.nsd_tolerance_mm)]
        for name, labels in regions.items():
            binary = [np.isin(a, labels).astype(np.uint8) for a in (pred, truth)]
            region_rows += [{"case": case.id} | r for r in case_scores(*binary, spacing, ["background", name],
                                                                        cfg.nsd_tolerance_mm)]
        if cfg.check_postprocessing:
            post.append(postprocessing_dice(pred, truth, class_names))
    return rows, region_rows, post


def write_scores(out_dir: Path, rows: list, summary: dict, comparison: dict | None, advice: dict | None) -> list[Path]:
    """per_case.csv, summary.json, and comparison.json and postprocessing.json where asked for; atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [write_csv(rows, out_dir / PER_CASE)]
    for name, content in (("summary.json", summary), ("comparison.json", comparison),
                          ("postprocessing.json", advice)):
        if content is not None:
            with atomic(out_dir / name) as tmp:
                tmp.write_text(json.dumps(content, indent=1))
            files.append(out_dir / name)
    if advice is not None:
        log.info(f"post-processing, mean Dice per class: {json.dumps(advice['mean_dice'])}")
        log.info(f"recommended: {advice['infer_overrides'] or 'none (no option raised a class mean Dice)'}")
    return files


def draw_overlays(cases: list, rows: list, class_names: list[str], cfg: DictConfig, out_dir: Path) -> dict:
    """Overlay PNGs of the worst cases by mean Dice over classes, plus any asked for by id: {case: (png, Dice)}."""
    mean_dice = case_means(rows)
    chosen = sorted(mean_dice, key=mean_dice.get)[: cfg.overlays]
    chosen += [c for c in cfg.cases if c not in chosen]
    overlays = {}
    for cid in chosen:
        case = next(c for c in cases if c.id == cid)
        pred, truth, affine = load_pair(case, len(class_names))
        image = None
        if case.image is not None:
            image, image_affine = read_array(case.image)
            image = image[..., 0] if image.ndim == 4 else image
            image = in_ras(image.astype(np.float32), image_affine) if image.shape == truth.shape else None
        png = plots.overlay(image, in_ras(truth, affine), in_ras(pred, affine), ras_spacing(affine), class_names,
                            out_dir / "overlays" / f"{cid}.png", title=f"{cid}: mean Dice {mean_dice[cid]:.3f}")
        overlays[cid] = (png, mean_dice[cid])
    return overlays


def log_summary(summary: dict, comparison: dict | None, cases: int, out_dir: Path) -> None:
    log.info(table(summary))
    if comparison:
        log.info(f"against {comparison['against']}, this evaluation minus that one:")
        for metric, label in COMPARED.items():
            log.info(f"  mean {label}: {difference_text(comparison[metric]['mean'])}")
            for name, d in comparison[metric]["classes"].items():
                log.info(f"    {name}: {difference_text(d)}")
    log.info(f"{cases} cases -> {out_dir.resolve()} (per_case.csv, summary.json, report.html)")


def log_to_tracking(cfg: DictConfig, summary: dict, files: list[Path], cases: list[Case], bundle: dict | None) -> None:
    """Summary means as metrics, every file as an artifact and the scored truths as a dataset, in an evaluation run of
    its own, linked to the training run it scored (and to its MLflow model); the training run is never reopened."""
    prefix = f"{cfg.split}_" if bundle is not None else "eval_"
    metrics = {f"{prefix}{m}_{c}": s[m]["mean"] for c, s in summary["classes"].items() for m in METRICS
               if s[m]["mean"] is not None}
    metrics |= {f"{prefix}{m}_mean": v for m, v in summary["mean"].items() if v is not None}
    metrics |= {f"{prefix}{m}_region_{r.replace(' ', '_')}": s[m]["mean"] for r, s in summary.get("regions", {}).items()
                for m in METRICS if s[m]["mean"] is not None}
    data = bundle["config"]["data"] if bundle is not None else None
    if data is not None:  # beside the training runs of the same dataset
        cfg = OmegaConf.merge(cfg, {"data": {"name": data["name"]}})  # a copy: cfg stays as given
    tracker, config = instantiate(cfg.tracking), OmegaConf.to_container(cfg, resolve=True)
    tracker.start(f"evaluate_{summary['source']['name'].replace(' ', '_')}", config, {"evaluation": "true"})
    try:
        tracker.link(bundle.get("run_id") if bundle is not None else None)
        if tracker.run_id:  # the truths' headers are read only for a store that keeps them
            truths = [c.truth for c in cases]
            name = f"{data['name']}/{cfg.split}" if data is not None else Path(cfg.truth).name
            shown = profile(truths, 1, list(summary["classes"])) if all(str(t).endswith(NIFTI) for t in truths) else {}
            tracker.log_datasets({"evaluation": VolumeDataset(name, data["root"] if data is not None else cfg.truth,
                                                              files_key(truths), shown)})
        tracker.log_metrics(metrics, step=bundle.get("epoch", 0) if bundle is not None else 0)
        folder = f"evaluation/{cfg.split}" if bundle is not None else "evaluation"
        for f in files:
            tracker.log_artifact(f, f"{folder}/overlays" if f.parent.name == "overlays" else folder)
    finally:
        tracker.finish()
    if tracker.run_id:
        log.info(f"logged to MLflow run {tracker.run_id}")
