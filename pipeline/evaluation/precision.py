"""The label check: does a reduced precision (bf16, fp16) segment as fp32 does? The Dice of its label maps against
fp32's, class by class, and both against the truth, on real cases (bench/precision.py runs it per task). A precision
may become a default only where it holds on every task."""

import time
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from pipeline.inference.predictor import Predictor

AGREES = 0.999  # Dice of the reduced precision's label map against fp32's, every class
TRUTH_DROP = 0.001  # the most the task's mean Dice against the truth may fall


def label_check(bundles: dict[Path, dict], cases: list[tuple[Path, Path | None]], amp: str, **options) -> dict:
    """Predict each (image, truth or None) with fp32 and with `amp` (PyTorch, the same windows and mirrors:
    `options` are PredictOptions fields) and compare: per class, the Dice between the two label maps pooled over the
    cases; the mean Dice against the truth of each; whether `amp` holds; seconds a case of each."""
    paths = {"fp32": Predictor(bundles, amp=False, backend="torch", **options),
             amp: Predictor(bundles, amp=amp, backend="torch", **options)}
    names = paths["fp32"].class_names
    overlap = np.zeros((len(names), 3))  # per class: voxels both label, fp32's, the reduced precision's
    truth_dice = {p: [] for p in paths}
    seconds = {p: 0.0 for p in paths}
    for image, truth in tqdm(cases, desc=f"label check fp32 vs {amp}", unit="case"):
        labels = {}
        for p, predictor in paths.items():
            start = time.perf_counter()
            labels[p] = predictor(image)[0]
            seconds[p] += time.perf_counter() - start
        a, b = labels["fp32"], labels[amp]
        for c in range(1, len(names)):
            overlap[c] += [((a == c) & (b == c)).sum(), (a == c).sum(), (b == c).sum()]
        if truth is not None:
            t = np.asarray(nib.load(truth).dataobj).reshape(a.shape)
            for p, pred in labels.items():
                truth_dice[p].append([dice(pred == c, t == c) for c in range(1, len(names))])
    agreement = {names[c]: round(float(2 * both / (n_a + n_b)), 6)
                 for c, (both, n_a, n_b) in enumerate(overlap) if c and n_a + n_b}
    truth_mean = {p: round(float(np.nanmean(d)), 6) for p, d in truth_dice.items() if d}
    holds = all(v >= AGREES for v in agreement.values()) and (
        not truth_mean or truth_mean[amp] >= truth_mean["fp32"] - TRUTH_DROP)
    return {"amp": amp, "precision": paths[amp].precision.name, "cases": len(cases), "agreement": agreement,
            "truth_dice": truth_mean, "holds": bool(holds),
            "seconds_per_case": {p: round(s / max(len(cases), 1), 3) for p, s in seconds.items()}}


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks; NaN where both are empty (a class absent from a case says nothing)."""
    total = pred.sum() + truth.sum()
    return float(2 * (pred & truth).sum() / total) if total else float("nan")
