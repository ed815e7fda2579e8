"""The demo phantoms and MSD case lists."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline import project_root
from pipeline.core.errors import InputError
from pipeline.data.checks import check
from pipeline.data.phantom import make_case
from pipeline.data.sources import case_id, read_msd, split
from pipeline.training.completion import complete
from tests.conftest import compose_config, shared_dataset


def test_phantoms_are_deterministic_varied_anisotropic_and_two_class():
    image, label, affine = make_case(0, 3)
    again = make_case(0, 3)
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(label, again[1])
    shapes = {make_case(0, i)[0].shape for i in range(6)}
    assert len(shapes) == 6  # every case has its own extent
    zooms = np.abs(np.diag(affine)[:3])
    assert zooms[2] > 2 * zooms[0]  # coarse through-plane spacing
    for i in range(6):
        _, lab, _ = make_case(0, i)
        counts = np.bincount(lab.ravel(), minlength=3)
        assert counts[1] > counts[2] > 0  # a large organ and smaller lesions in every case


def test_phantom_set_is_a_valid_msd_dataset(tiny_phantom):
    dataset = read_msd(tiny_phantom)
    assert dataset.labels == {0: "background", 1: "organ", 2: "lesion"} and dataset.modalities == ["MRI"]
    assert len(dataset.cases) == 8
    image, label = nib.load(dataset.cases[0]["image"]), nib.load(dataset.cases[0]["label"])
    assert image.shape == label.shape and np.allclose(image.affine, label.affine)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # not RAS: preprocessing must reorient


def test_split_is_deterministic_disjoint_and_complete():
    cases = [{"image": str(i)} for i in range(20)]
    parts = split(cases, val=0.15, test=0.15, seed=0)
    assert split(cases, val=0.15, test=0.15, seed=0) == parts
    assert split(cases, val=0.15, test=0.15, seed=1) != parts
    assert [len(parts[k]) for k in ("train", "val", "test")] == [14, 3, 3]
    ids = [c["image"] for k in ("train", "val", "test") for c in parts[k]]
    assert sorted(ids) == sorted(c["image"] for c in cases)  # every case once: disjoint and complete


def test_folds_share_the_test_split_and_validate_every_other_case_once():
    cases = [{"image": str(i)} for i in range(23)]
    folds = [split(cases, val=0.15, test=0.15, seed=0, folds=5, fold=k) for k in range(5)]
    test = folds[0]["test"]
    assert all(f["test"] == test for f in folds)
    validated = [c["image"] for f in folds for c in f["val"]]
    assert sorted(validated) == sorted(c["image"] for c in cases if c not in test)  # each non-test case exactly once
    for f in folds:
        assert not {c["image"] for c in f["train"]} & {c["image"] for c in f["val"] + f["test"]}
    with pytest.raises(InputError, match="data.fold=5"):
        split(cases, 0.15, 0.15, 0, folds=5, fold=5)
    # nnU-Net's "all": every non-test case trains
    final = split(cases, val=0.15, test=0.15, seed=0, folds=5, fold="all")
    assert final["test"] == test
    assert sorted(c["image"] for c in final["train"]) == sorted(validated)
    assert {c["image"] for c in final["val"]} <= {c["image"] for c in final["train"]} and final["val"]


def test_folder_pairs_are_read_by_matching_names(tiny_phantom, tmp_path):
    (tmp_path / "images").mkdir(), (tmp_path / "labels").mkdir()
    for name in ("phantom_000.nii.gz", "phantom_001.nii.gz"):
        (tmp_path / "images" / name).symlink_to(tiny_phantom / "imagesTr" / name)
        (tmp_path / "labels" / name).symlink_to(tiny_phantom / "labelsTr" / name)
    cfg = compose_config("train", ["data=folders", f"data.root={tmp_path}",
                                   "data.class_names=[background,organ,lesion]"], tmp_path)
    dataset = complete(cfg).dataset
    assert [case_id(c) for c in dataset.cases] == ["phantom_000", "phantom_001"]
    assert cfg.data.num_classes == 3 and cfg.data.in_channels == 1
    (tmp_path / "labels" / "phantom_001.nii.gz").unlink()
    with pytest.raises(InputError, match="phantom_001.nii.gz: no label with the same name"):
        complete(compose_config("train", ["data=folders", f"data.root={tmp_path}", "data.class_names=[a,b,c]"],
                                    tmp_path))


def test_a_missing_data_root_is_an_error_and_nothing_is_generated(tmp_path):
    cfg = compose_config("train", [f"data.root={tmp_path}/typo"], tmp_path)
    with pytest.raises(InputError, match="typo/dataset.json: not found"):
        complete(cfg)
    assert not (tmp_path / "typo").exists()


def test_a_listed_but_missing_file_is_named(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "x"}, "modality": {"0": "CT"},
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}],
    }))
    with pytest.raises(InputError, match="imagesTr/a.nii.gz: listed in .* but missing"):
        read_msd(tmp_path)


def test_train_cli_reports_a_bad_data_root_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline.train", f"data.root={tmp_path}/nowhere", "tracking=none"],
                          capture_output=True, text=True, cwd=project_root())
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path}/nowhere/dataset.json: not found")


def test_debug_true_shows_the_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline.train", f"data.root={tmp_path}/nowhere", "tracking=none",
                           "debug=true"],
                          capture_output=True, text=True, cwd=project_root())
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "InputError" in done.stderr


def nnunet_copy(source: Path, folder: Path, n: int, ending: str = ".nii.gz", channels: int = 1) -> Path:
    """The first n cases of an MSD dataset as an nnU-Net v2 raw dataset: channel c of a case is its image times
    c + 1; NIfTI cases are linked, other endings written with SimpleITK (their LPS geometry from the NIfTI's)."""
    import SimpleITK as sitk

    meta = json.loads((source / "dataset.json").read_text())
    (folder / "imagesTr").mkdir(parents=True), (folder / "labelsTr").mkdir()
    for case in meta["training"][:n]:
        cid = Path(case["image"]).name.removesuffix(".nii.gz")
        label = source / case["label"]
        for c in range(channels):
            target = folder / "imagesTr" / f"{cid}_{c:04d}{ending}"
            if ending == ".nii.gz" and c == 0:
                target.symlink_to((source / case["image"]).resolve())
            else:
                image = sitk.ReadImage(str(source / case["image"]))
                sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32) * (c + 1), str(target))
        if ending == ".nii.gz":
            (folder / "labelsTr" / f"{cid}{ending}").symlink_to(label.resolve())
        else:
            sitk.WriteImage(sitk.ReadImage(str(label)), str(folder / "labelsTr" / f"{cid}{ending}"))
    labels = {name: int(k) for k, name in meta["labels"].items()}
    spec = {"channel_names": {str(c): f"MRI{c}" for c in range(channels)}, "labels": labels, "numTraining": n,
            "file_ending": ending, "name": "Dataset004_Hippocampus"}
    (folder / "dataset.json").write_text(json.dumps(spec))
    return folder


def test_an_nnunet_dataset_is_read_as_it_is(tmp_path):
    source = shared_dataset("msd_hippocampus")
    root = nnunet_copy(source, tmp_path / "Dataset004_Hippocampus", 8)
    cfg = compose_config("train", ["data=nnunet", f"data.root={root}"], tmp_path)
    done = complete(cfg)
    assert [case_id(c) for c in done.dataset.cases][:2] == ["hippocampus_001", "hippocampus_003"]
    assert (cfg.data.num_classes, cfg.data.in_channels) == (3, 1)
    assert list(cfg.data.class_names) == ["background", "Anterior", "Posterior"]
    assert done.dataset.cases[0]["image"].endswith("imagesTr/hippocampus_001_0000.nii.gz")  # read in place
    assert check(cfg, progress=False)["faults"] == []


@pytest.mark.parametrize("ending", [".nrrd", ".mha"])
def test_a_two_channel_nnunet_dataset_trains_on_converted_copies_with_the_same_voxels(ending, tmp_path):
    from monai.transforms import Compose

    from pipeline.data.transforms import preprocess

    source = shared_dataset("msd_hippocampus")
    root = nnunet_copy(source, tmp_path / "Dataset104_Two", 3, ending=ending, channels=2)
    cfg = compose_config("train", ["data=nnunet", f"data.root={root}", "data.split.val=0.34", "data.split.test=0"],
                         tmp_path)
    done = complete(cfg)
    assert cfg.data.in_channels == 2 and check(cfg, progress=False)["faults"] == []
    case = done.dataset.cases[0]
    assert Path(case["image"]).is_relative_to(tmp_path / "outputs" / "converted")
    loaded = Compose(preprocess(cfg))(case)
    reference = Compose(preprocess(cfg))({"image": str(source / "imagesTr" / "hippocampus_001.nii.gz"),
                                          "label": str(source / "labelsTr" / "hippocampus_001.nii.gz")})
    assert loaded["image"].shape == (2, *reference["image"].shape[1:])
    np.testing.assert_array_equal(loaded["label"].numpy(), reference["label"].numpy())
    assert np.allclose(loaded["image"].affine, reference["image"].affine, atol=1e-5)
    before = Path(case["image"]).stat().st_mtime_ns
    complete(compose_config("train", ["data=nnunet", f"data.root={root}", "data.split.val=0.34",
                                      "data.split.test=0"], tmp_path))
    assert Path(case["image"]).stat().st_mtime_ns == before  # converted once, then reused


def test_nnunet_faults_are_named_in_one_line_each(tmp_path):
    source = shared_dataset("msd_hippocampus")
    root = nnunet_copy(source, tmp_path / "Dataset204_Faulty", 3, ending=".nii.gz", channels=1)
    spec = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps(spec | {"labels": {"background": 0, "whole": [1, 2]}}))
    cfg = compose_config("train", ["data=nnunet", f"data.root={root}"], tmp_path)
    with pytest.raises(InputError, match=r"dataset.json: labels.whole: region-based labels are not supported"):
        complete(cfg)
    (root / "dataset.json").write_text(json.dumps(spec | {"numTraining": 4}))
    (root / "imagesTr" / "hippocampus_003_0000.nii.gz").unlink()
    faults = check(compose_config("train", ["data=nnunet", f"data.root={root}"], tmp_path), progress=False)["faults"]
    assert faults[0].endswith("dataset.json: numTraining is 4 but " f"{root / 'labelsTr'} holds 3 .nii.gz files")
    assert faults[1] == (f"{root / 'imagesTr' / 'hippocampus_003_0000.nii.gz'}: missing (channel 0 of case "
                         f"hippocampus_003, listed in {root / 'dataset.json'} channel_names)")
