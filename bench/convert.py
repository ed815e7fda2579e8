"""Datasets distributed in layouts of their own, converted once into MSD layout (as nnU-Net's dataset_conversion
scripts do): the source is only read, the copy is written atomically and reused."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.files import atomic

# BRATS 2015's labels, and the regions its challenge scores (whole tumour, tumour core, enhancing tumour)
BRATS_LABELS = {"0": "background", "1": "necrosis", "2": "edema", "3": "non-enhancing", "4": "enhancing"}
BRATS_REGIONS = {"whole_tumour": [1, 2, 3, 4], "tumour_core": [1, 3, 4], "enhancing_tumour": [4]}


def brats_as_msd(source: str | Path, target: str | Path) -> Path:
    """The BRATS subset (one folder per case: Flair_ and T1c_subtrMeanDivStd.nii.gz, OTMultiClass.nii.gz) as an MSD
    dataset at `target`: FLAIR and T1c stacked as channels of one 4D NIfTI. Returns target."""
    source, target = Path(source), Path(target)
    if (target / "dataset.json").is_file():
        return target
    cases = sorted(p for p in source.iterdir() if p.is_dir())
    if not cases:
        raise InputError(f"{source}: holds no case folders (BRATS layout: <case>/Flair_subtrMeanDivStd.nii.gz, ...)")
    training = []
    for case in cases:
        files = [case / f"{m}_subtrMeanDivStd.nii.gz" for m in ("Flair", "T1c")] + [case / "OTMultiClass.nii.gz"]
        if missing := [f for f in files if not f.is_file()]:
            raise InputError(f"{missing[0]}: missing (a BRATS case folder holds FLAIR, T1c and OTMultiClass)")
        flair, t1c, label = (nib.load(f) for f in files)
        stacked = np.stack([flair.get_fdata(dtype=np.float32), t1c.get_fdata(dtype=np.float32)], axis=-1)
        for folder, image in (("imagesTr", nib.Nifti1Image(stacked, flair.affine)),
                              ("labelsTr", nib.Nifti1Image(np.asarray(label.dataobj).astype(np.uint8), label.affine))):
            (target / folder).mkdir(parents=True, exist_ok=True)
            with atomic(target / folder / f"{case.name}.nii.gz") as tmp:
                nib.save(image, tmp)
        training.append({"image": f"./imagesTr/{case.name}.nii.gz", "label": f"./labelsTr/{case.name}.nii.gz"})
    with atomic(target / "dataset.json") as tmp:  # last: its presence says the copy is whole
        tmp.write_text(json.dumps({"name": "BratsSubset", "modality": {"0": "FLAIR", "1": "T1c"},
                                   "labels": BRATS_LABELS, "training": training}, indent=1))
    return target


# TotalSegmentator's test CTs: (image, its label map), each pair named after the image
TOTALSEG_PAIRS = {"example_ct.nii.gz": "example_seg_fast_force_split.nii.gz",
                  "example_ct_sm.nii.gz": "example_seg.nii.gz"}


def totalseg_as_folders(source: str | Path, target: str | Path) -> Path:
    """TotalSegmentator's example CTs (image and label files side by side, named differently) as folder pairs at
    `target`: images/<name> and labels/<name>, copied (3 MB). Returns target."""
    source, target = Path(source), Path(target)
    for image, label in TOTALSEG_PAIRS.items():
        for folder, file in (("images", image), ("labels", label)):
            if not (source / file).is_file():
                raise InputError(f"{source / file}: missing (TotalSegmentator's examples: {', '.join(TOTALSEG_PAIRS)} "
                                 "with their label maps)")
            copy = target / folder / image
            copy.parent.mkdir(parents=True, exist_ok=True)
            if not copy.exists():
                with atomic(copy) as tmp:
                    shutil.copyfile(source / file, tmp)
    return target
