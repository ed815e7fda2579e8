"""Dataset check (`python -m pipeline.check data.root=...`; training runs it first): every fault of a dataset at once.

In the spirit of nnU-Net's verify_dataset_integrity: unreadable files (corrupt gzip, truncated, not an image),
image/label shape or affine mismatch, NaN/Inf voxels, wrong dimensionality (a trailing singleton axis, as in
(x, y, z, 1) files, is not a fault), label values that are not integers or not
declared classes, duplicate or escaping paths, too few cases for the split. Empty labels are allowed and counted.
"""

import gzip
import logging
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.core.errors import InputError
from pipeline.data.io import label_fault, spatial
from pipeline.data.sources import case_id, data_facts, dataset_problems
from pipeline.data.subjects import SPLITS_FILE, looks_grouped_warning, split_dataset

log = logging.getLogger(__name__)

AFFINE_TOLERANCE = 1e-3  # mm; image and label grids further apart than this do not overlay


def read(path: str) -> tuple[nib.Nifti1Image | None, np.ndarray | None, str | None]:
    """(image, voxels, None) or (None, None, the reason it cannot be read)."""
    try:
        image = nib.load(path)
        return image, spatial(np.asarray(image.dataobj)), None
    except (gzip.BadGzipFile, zlib.error, OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as err:
        text = str(err).lower()
        if isinstance(err, (gzip.BadGzipFile, zlib.error)) or "gzip" in text or "crc" in text:
            reason = "corrupt gzip"
        elif isinstance(err, EOFError) or any(w in text for w in ("truncat", "end of", "too short", "damaged",
                                                                  "cannot reshape")):
            reason = "truncated file"
        else:
            reason = "not a NIfTI image"
        return None, None, f"{path}: unreadable, {reason} ({type(err).__name__})"


def check_case(case: dict, num_classes: int, channels: int) -> tuple[list[str], bool]:
    """(faults, label is empty) for one image/label pair."""
    faults = []
    image, voxels, why = read(case["image"])
    label, classes, why_label = read(case["label"])
    faults += [w for w in (why, why_label) if w]
    if image is not None:
        expected = 3 if channels == 1 else 4
        if voxels.ndim != expected or (channels > 1 and voxels.shape[3] != channels):
            faults.append(f"{case['image']}: a {voxels.ndim}D volume {voxels.shape} where {expected}D"
                          f"{f' with {channels} channels' if channels > 1 else ''} is expected")
        elif not np.isfinite(voxels).all():
            bad = int((~np.isfinite(voxels)).sum())
            faults.append(f"{case['image']}: {bad} NaN or Inf voxels")
    empty = False
    if label is not None:
        if classes.ndim != 3:
            faults.append(f"{case['label']}: a {classes.ndim}D label map {classes.shape} where 3D is expected")
        elif fault := label_fault(case["label"], classes, num_classes):
            faults.append(fault)
        else:
            empty = not classes.any()
    if image is not None and label is not None and voxels.ndim >= 3 and classes.ndim == 3:
        if voxels.shape[:3] != classes.shape:
            faults.append(f"{case['label']}: shape {classes.shape} differs from its image's {voxels.shape[:3]}")
        elif (d := float(np.abs(image.affine - label.affine).max())) > AFFINE_TOLERANCE:
            faults.append(f"{case['label']}: affine differs from its image's by {d:.3g} (tolerance {AFFINE_TOLERANCE})")
    return faults, empty


def check(cfg: DictConfig, *, progress: bool = True) -> dict:
    """Every fault of the dataset at cfg.data; returns {"cases", "faults": [...], "empty": [...], "warnings": [...],
    "dataset": the cases as read (None where its listing cannot be read), which training hands on to its completion}."""
    d = cfg.data
    root = Path(d.root).expanduser()
    dataset, faults = dataset_problems(d)
    if dataset is None:
        return {"cases": 0, "faults": faults, "empty": [], "warnings": [], "dataset": None}
    facts = data_facts(d, dataset)
    num_classes, channels = facts["num_classes"], facts["in_channels"]
    empty = []
    present = [c for c in dataset.cases if Path(c["image"]).is_file() and Path(c["label"]).is_file()]
    for case in tqdm(present, desc="check", unit="case", disable=not progress):
        case_faults, is_empty = check_case(case, num_classes, channels)
        faults += case_faults
        if is_empty:
            empty.append(case["label"])
    try:
        split_dataset(d, dataset)
    except InputError as err:
        faults.append(f"{root}: {err}")
    grouped = (root / SPLITS_FILE).is_file() or any("subject" in c for c in dataset.cases)
    warning = looks_grouped_warning(root, [case_id(c) for c in dataset.cases], d.split.get("group"), d.split.folds,
                                    has_fixed=grouped)
    return {"cases": len(dataset.cases), "faults": faults, "empty": empty, "warnings": [warning] if warning else [],
            "dataset": dataset}


def log_report(root, report: dict, then: str = "") -> None:
    """check()'s faults, one `error:` line each, and a summary line (with `then`: what to do next)."""
    for fault in report["faults"]:
        log.error(fault)
    for warning in report.get("warnings", []):
        log.warning(warning)
    log.info(f"{root}: {report['cases']} cases, {len(report['faults'])} faults, {len(report['empty'])} empty labels "
             f"(allowed){then}")
