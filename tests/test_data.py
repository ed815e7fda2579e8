"""The demo phantoms and MSD case lists."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from pipeline import project_root
from pipeline.completion import complete
from pipeline.data.phantom import make_case
from pipeline.data.sources import case_id, read_msd, split
from pipeline.errors import InputError
from tests.conftest import compose_config


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
