"""Dataset fingerprint: one pass over the training cases, cached by the file list with sizes and mtimes.

Geometry is reported in RAS axis order (what the network sees after `Orientationd`), intensities from foreground
voxels only (nnU-Net's choice: background statistics say nothing about the structures to segment). Each case's
nonzero bounding box is measured too: nnU-Net crops every case to it, and the plan does where it is much smaller than
the volume (skull-stripped MRI).
"""

import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation
from tqdm.auto import tqdm

from pipeline.core.errors import InputError
from pipeline.core.files import atomic
from pipeline.data.io import spatial

SAMPLES_PER_CASE = 10_000
VERSION = 3  # bumped when a fingerprint gains a field: older cached ones are measured again


def cache_key(cases: list[dict]) -> str:
    """Changes when any file is added, removed, resized or touched."""
    return files_key([case[key] for case in cases for key in ("image", "label")])


def files_key(paths: list) -> str:
    """A digest of these files' paths, sizes and modification times."""
    stats = [(str(p), (st := os.stat(p)).st_size, st.st_mtime_ns) for p in paths]
    return hashlib.sha1(json.dumps(sorted(stats)).encode()).hexdigest()[:16]


def measure_case(case: dict, rng: np.random.Generator) -> dict:
    image, label = nib.load(case["image"]), nib.load(case["label"])
    if image.shape[:3] != label.shape[:3]:
        raise InputError(f"{case['label']}: shape {label.shape[:3]} differs from its image's {image.shape[:3]}")
    axes = io_orientation(image.affine)[:, 0].astype(int)  # voxel axis i runs along RAS axis axes[i]
    shape, spacing = np.empty(3, int), np.empty(3)
    shape[axes], spacing[axes] = image.shape[:3], image.header.get_zooms()[:3]
    data = np.asarray(image.dataobj, dtype=np.float32).reshape(*image.shape[:3], -1)  # channels last
    lab = spatial(np.asarray(label.dataobj)).astype(np.int64)
    fg = data[lab > 0]
    if len(fg) > SAMPLES_PER_CASE:
        fg = fg[rng.choice(len(fg), SAMPLES_PER_CASE, replace=False)]
    mask = data.any(axis=3)  # nonzero in any channel: the bounding box is nnU-Net's crop (RAS order below)
    nonzero = np.empty(3, int)
    nonzero[axes] = ([np.ptp(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != i)))) + 1
                      for i in range(3)] if mask.any() else image.shape[:3])
    return {"shape": shape.tolist(), "spacing": spacing.tolist(), "nonzero_shape": nonzero.tolist(),
            "minimum": data.min(axis=(0, 1, 2)).tolist(), "counts": np.bincount(lab.ravel()).tolist(), "fg": fg}


def fingerprint(cases: list[dict], cache_dir: str | Path) -> dict:
    """Shapes, spacings, foreground intensity statistics per channel and class voxel frequencies."""
    path = Path(cache_dir) / f"{cache_key(cases)}-v{VERSION}.json"
    if path.exists():
        return json.loads(path.read_text())
    rng = np.random.default_rng(0)
    rows = [measure_case(c, rng) for c in tqdm(cases, desc="fingerprint", unit="case")]
    fg = np.concatenate([r["fg"] for r in rows])
    counts = np.zeros(max(len(r["counts"]) for r in rows))
    for r in rows:
        counts[: len(r["counts"])] += r["counts"]
    fp = {
        "num_cases": len(rows),
        "shapes": [r["shape"] for r in rows],
        "spacings": [r["spacing"] for r in rows],
        "nonzero_shapes": [r["nonzero_shape"] for r in rows],
        "minimum": np.median([r["minimum"] for r in rows], axis=0).tolist(),  # per channel, the median case's
        "median_shape": np.median([r["shape"] for r in rows], axis=0).tolist(),
        "median_spacing": np.median([r["spacing"] for r in rows], axis=0).tolist(),
        "intensity": [  # per channel, foreground only
            {"mean": float(c.mean()), "std": float(c.std()),
             **{f"p{q}": float(np.percentile(c, q)) for q in (0.5, 50, 99.5)}}
            for c in fg.T
        ],
        "class_frequency": (counts / counts.sum()).tolist(),
    }
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(fp, indent=1))
    return fp


def profile(images: list, channels: int, class_names: list[str]) -> dict:
    """A few lines that say what a set of cases is (an MLflow dataset's profile), from their NIfTI headers alone:
    no voxel is read, so it costs milliseconds a case."""
    headers = [nib.load(p).header for p in images]
    return {"cases": len(images), "channels": channels, "classes": list(class_names),
            "median_shape": np.median([h.get_data_shape()[:3] for h in headers], axis=0).tolist(),
            "median_spacing": np.round(np.median([h.get_zooms()[:3] for h in headers], axis=0), 4).tolist()}
