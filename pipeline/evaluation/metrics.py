"""Segmentation metrics from MONAI: Dice and IoU during training; the full per-case set for `pipeline.evaluate`."""

import warnings

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_confusion_matrix_metric,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
    get_confusion_matrix,
)
from monai.networks.utils import one_hot
from scipy.stats import bootstrap, wilcoxon


class SegmentationScores:
    """Accumulates MONAI's per-volume Dice and IoU; foreground classes only, as nnU-Net reports them."""

    def __init__(self, class_names: list[str]):
        self.names = list(class_names)[1:]
        self.num_classes = len(class_names)
        # Per-volume scores (NaN where the reference lacks a class), averaged here with nanmean: MONAI's "mean_batch"
        # turns a class absent from every reference volume into 0, dragging the mean down for a class never there.
        # Kept here rather than in MONAI's metric objects, whose buffers all-gather across DDP ranks when read (which
        # hangs where one rank has no volume); the ranks' totals are reduced explicitly instead (see compute).
        self.rows = {"dice": [], "iou": []}

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """pred, label: integer label maps shaped (B, 1, *spatial)."""
        p, y = one_hot(pred, self.num_classes), one_hot(label, self.num_classes)
        self.rows["dice"].append(compute_dice(p, y, include_background=False, ignore_empty=True))
        self.rows["iou"].append(compute_iou(p, y, include_background=False, ignore_empty=True))

    def per_volume(self) -> dict[str, torch.Tensor]:
        """This process's scores so far, (volumes, foreground classes) per metric; NaN where a class is absent from
        a reference."""
        return {name: torch.cat(rows).float() if rows else torch.zeros(0, self.num_classes - 1)
                for name, rows in self.rows.items()}

    def totals(self) -> torch.Tensor:
        """(metric, [sum, count], class) for dice and iou: the sum of the defined per-volume scores and their number."""
        return torch.stack([torch.stack([torch.nansum(v, 0), (~torch.isnan(v)).sum(0).float()])
                            for v in self.per_volume().values()])

    def compute(self, prefix: str = "val_", reduce=None) -> dict[str, float]:
        """Per class the mean over volumes where it is defined (nanmean), then the mean over classes. `reduce`
        (distributed.all_reduce under DDP) sums the totals of every rank first: each rank gets the mean over all
        volumes."""
        totals = self.totals() if reduce is None else reduce(self.totals())
        out = {}
        for metric, (sums, counts) in zip(("dice", "iou"), totals):
            values = sums / counts  # torch.nanmean's own arithmetic
            for name, v in zip(self.names, values.tolist()):
                out[f"{prefix}{metric}_{name}"] = v
            out[f"{prefix}{metric}_mean"] = float(torch.nanmean(values))
        self.rows = {"dice": [], "iou": []}
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Per-case evaluation (pipeline.evaluate): overlap, distance and volume metrics per foreground class.

# MONAI's surface metrics pass a deprecated argument to its own get_mask_edges (1.6): nothing a user can act on.
warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)

METRICS = ("dice", "iou", "precision", "recall", "specificity", "f1", "accuracy", "hd95_mm", "assd_mm", "nsd",
           "truth_ml", "pred_ml", "diff_ml")

EMPTY_RULES = (
    "A class absent from both truth and prediction scores Dice, IoU, F1 and NSD 1 and HD95/ASSD 0 mm (nothing to find, "
    "nothing found). Absent from exactly one of them: Dice, IoU, F1 and NSD 0 and HD95/ASSD the image diagonal in mm "
    "(the worst distance possible on that grid), so a missed or invented structure is averaged in as a failure, not "
    "dropped. Precision is undefined without predicted voxels and recall without true voxels: those cells are empty "
    "(NaN) and every summary states n, the number of cases averaged."
)


def case_scores(pred: np.ndarray, truth: np.ndarray, spacing, class_names: list[str],
                tolerance_mm: float = 1.0) -> list[dict]:
    """One row per foreground class for one case: MONAI's overlap, confusion-matrix and surface metrics, in mm.

    `pred`, `truth`: integer label maps (x, y, z) on the same grid; `spacing`: its voxel size in mm. Empty classes
    follow EMPTY_RULES. HD95 is MONAI's: the larger of the two directed 95th percentiles of surface distances.
    """
    k = len(class_names)
    p = one_hot(torch.as_tensor(pred.astype(np.int64))[None, None], k)
    y = one_hot(torch.as_tensor(truth.astype(np.int64))[None, None], k)
    spacing = [float(s) for s in spacing]
    cm = get_confusion_matrix(p, y, include_background=False)[0]  # (K-1, 4): tp, fp, tn, fn
    ratios = {name: compute_confusion_matrix_metric(monai_name, cm) for name, monai_name in
              (("precision", "precision"), ("recall", "sensitivity"), ("specificity", "specificity"),
               ("f1", "f1 score"), ("accuracy", "accuracy"))}
    dice = compute_dice(p, y, include_background=False, ignore_empty=False)[0]  # both empty -> 1, one empty -> 0
    iou = compute_iou(p, y, include_background=False, ignore_empty=False)[0]
    voxel_ml = float(np.prod(spacing)) / 1000
    diagonal = float(np.linalg.norm(np.array(truth.shape) * spacing))
    rows = []
    for c in range(1, k):
        tp, fp, _, fn = (float(v) for v in cm[c - 1])
        truth_empty, pred_empty = tp + fn == 0, tp + fp == 0
        row = {"class": class_names[c], "dice": float(dice[c - 1]), "iou": float(iou[c - 1])}
        row |= {name: float(v[c - 1]) for name, v in ratios.items()}
        if not (truth_empty or pred_empty):
            pc, yc = p[:, c:c + 1], y[:, c:c + 1]
            row["hd95_mm"] = float(compute_hausdorff_distance(pc, yc, include_background=True, percentile=95,
                                                              spacing=spacing))
            row["assd_mm"] = float(compute_average_surface_distance(pc, yc, include_background=True, symmetric=True,
                                                                    spacing=spacing))
            row["nsd"] = float(compute_surface_dice(pc, yc, [tolerance_mm], include_background=True, spacing=spacing))
        elif truth_empty and pred_empty:
            row |= {"f1": 1.0, "hd95_mm": 0.0, "assd_mm": 0.0, "nsd": 1.0}
        else:
            row |= {"f1": 0.0, "hd95_mm": diagonal, "assd_mm": diagonal, "nsd": 0.0}
        row |= {"truth_ml": (tp + fn) * voxel_ml, "pred_ml": (tp + fp) * voxel_ml, "diff_ml": (fp - fn) * voxel_ml}
        row["empty"] = ("both" if truth_empty and pred_empty else "truth" if truth_empty
                        else "pred" if pred_empty else "")
        rows.append(row)
    return rows


def summarize(rows: list[dict], class_names: list[str]) -> dict:
    """Mean, std, median and n (cases with a defined value) per class and metric, plus the mean over classes."""
    summary = {"classes": {}, "mean": {}, "empty": {}}
    for name in class_names[1:]:
        mine = [r for r in rows if r["class"] == name]
        summary["classes"][name] = {}
        for metric in METRICS:
            values = np.array([r[metric] for r in mine], dtype=float)
            defined = values[~np.isnan(values)]
            summary["classes"][name][metric] = {
                "mean": float(defined.mean()) if defined.size else None,
                "std": float(defined.std()) if defined.size else None,
                "median": float(np.median(defined)) if defined.size else None,
                "n": int(defined.size),
            }
        summary["empty"][name] = {kind: sum(r["empty"] == kind for r in mine) for kind in ("truth", "pred", "both")}
    for metric in METRICS:
        means = [c[metric]["mean"] for c in summary["classes"].values() if c[metric]["mean"] is not None]
        summary["mean"][metric] = float(np.mean(means)) if means else None
    return summary


def paired_difference(ours: dict[str, float], theirs: dict[str, float], resamples: int = 10_000) -> dict:
    """Mean of ours - theirs over the same cases, its 95% interval from paired bootstrap resamples of the cases
    (percentile) and the Wilcoxon signed-rank p-value: does a change beat the case-to-case spread of one test set?"""
    diff = np.array([ours[c] - theirs[c] for c in sorted(ours)])
    if np.ptp(diff) < 1e-12:  # every case moved alike (e.g. not at all): nothing to resample, the interval is a point
        low = high = float(diff[0])
    else:
        ci = bootstrap((diff,), np.mean, n_resamples=resamples, method="percentile", rng=np.random.default_rng(0))
        low, high = float(ci.confidence_interval.low), float(ci.confidence_interval.high)
    return {"cases": len(diff), "difference": float(diff.mean()), "ci95": [low, high],
            "higher": int((diff > 0).sum()), "lower": int((diff < 0).sum()),
            "wilcoxon_p": float(wilcoxon(diff).pvalue) if diff.any() else 1.0}
