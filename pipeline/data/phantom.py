"""The embedded demo dataset: deterministic synthetic 3D phantoms written as NIfTI in MSD layout.

Each case is a body (soft tissue in air) holding an "organ" (a large rotated ellipsoid, class 1) with one to three
"lesions" (small spheres, darker than the organ, class 2), on an anisotropic grid, under a smooth multiplicative bias
field and Gaussian noise. Shapes, sizes, positions and volume extents vary per case; the same seed gives the same set.
"""

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

log = logging.getLogger(__name__)

LABELS = {"0": "background", "1": "organ", "2": "lesion"}
SPACING = (1.0, 1.0, 2.5)  # mm; coarse through-plane like most clinical MRI/CT


def _ellipsoid(coords: np.ndarray, center, radii, angle: float = 0.0) -> np.ndarray:
    """Mask of an ellipsoid (in mm) rotated by `angle` about the z axis."""
    d = coords - np.asarray(center, dtype=np.float32)[:, None, None, None]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * d[0] + s * d[1], -s * d[0] + c * d[1]
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (d[2] / radii[2]) ** 2 <= 1.0


def make_case(seed: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom: (image float32, label uint8, affine). Deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    shape = (int(rng.integers(64, 89)), int(rng.integers(64, 89)), int(rng.integers(24, 37)))
    coords = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, SPACING)],
                                  indexing="ij")).astype(np.float32)
    extent = np.array(shape) * np.array(SPACING)
    mid = extent / 2

    body = _ellipsoid(coords, mid + rng.uniform(-3, 3, 3), extent * rng.uniform(0.40, 0.47, 3), rng.uniform(0, np.pi))
    organ_radii = np.array([rng.uniform(14, 22), rng.uniform(11, 17), rng.uniform(12, 20)])
    organ_center = mid + rng.uniform(-0.12, 0.12, 3) * extent * np.array([1, 1, 0.3])
    organ = _ellipsoid(coords, organ_center, organ_radii, rng.uniform(0, np.pi)) & body

    lesions = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(5, 9)
        offset = rng.uniform(-0.55, 0.55, 3) * np.maximum(organ_radii - r, 0)
        lesions |= _ellipsoid(coords, organ_center + offset, (r, r, r))
    lesions &= organ

    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    label[lesions] = 2

    image = np.where(body, 100.0, 5.0).astype(np.float32)
    image[organ] = rng.uniform(150, 170)
    image[lesions] = rng.uniform(65, 85)
    # A smooth bias field: low-order polynomial in normalised coordinates, about +-20 percent.
    x = coords / extent[:, None, None, None] - 0.5
    a = rng.uniform(-0.35, 0.35, 6)
    bias = np.exp(a[0] * x[0] + a[1] * x[1] + a[2] * x[2] + a[3] * x[0] * x[1] + a[4] * x[0] ** 2 + a[5] * x[1] ** 2)
    image = image * bias + rng.normal(0.0, rng.uniform(8, 14), shape)

    # Stored in LPS orientation with a non-zero origin, as DICOM-converted volumes often are.
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    return image.astype(np.float32), label, affine


def synthesize(root: str | Path, num_cases: int = 40, seed: int = 0) -> Path:
    """Write `num_cases` phantoms to `root` in MSD layout; atomic: a crash leaves no half-written dataset."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        training = []
        for i in range(num_cases):
            image, label, affine = make_case(seed, i)
            name = f"phantom_{i:03d}.nii.gz"
            nib.save(nib.Nifti1Image(image, affine), tmp / "imagesTr" / name)
            nib.save(nib.Nifti1Image(label, affine), tmp / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        meta = {
            "name": "Phantom",
            "description": f"Synthetic 3D phantoms: organ with lesions, bias field and noise (seed {seed}).",
            "tensorImageSize": "3D",
            "modality": {"0": "MRI"},
            "labels": LABELS,
            "numTraining": num_cases,
            "numTest": 0,
            "training": training,
            "test": [],
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main() -> None:
    from pipeline import project_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=project_root() / "data" / "phantom")
    parser.add_argument("--num-cases", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    log.info(f"wrote {synthesize(args.root, args.num_cases, args.seed)}")


if __name__ == "__main__":
    main()
