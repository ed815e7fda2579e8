"""The bad-input matrix: each fault is found by `pipeline.check`, named with its file, and stops training cleanly."""

import gzip
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline import project_root
from pipeline.core.errors import first_line
from pipeline.data.checks import check
from tests.conftest import compose_config

AFFINE = np.diag([0.9, 0.9, 2.0, 1.0])


def write_case(root, name, image=None, label=None, affine=AFFINE, label_affine=None):
    rng = np.random.default_rng(len(name))
    image = rng.normal(size=(12, 12, 6)).astype(np.float32) if image is None else image
    if label is None:
        label = np.zeros((12, 12, 6), np.uint8)
        label[3:8, 3:8, 2:4] = 1
        label[9:11, 9:11, 1:3] = 2
    nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine if label_affine is None else label_affine),
             root / "labelsTr" / f"{name}.nii.gz")
    return {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}


@pytest.fixture
def dataset(tmp_path):
    """Eight clean cases; `write(meta)` rewrites dataset.json."""
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = {"name": "Tiny", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"},
            "training": [write_case(root, f"case_{i}") for i in range(8)]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root, meta


def faults_of(root, overrides=()):
    return check(compose_config("train", ["data=msd", f"data.root={root}", *overrides], root.parent / "run"),
                 progress=False)


def corrupt_gzip(root, meta):
    path = root / "imagesTr" / "case_1.nii.gz"
    data = bytearray(path.read_bytes())
    data[10:40] = b"\xff" * 30  # the start of the deflate stream
    path.write_bytes(bytes(data))
    return "case_1.nii.gz: unreadable, corrupt gzip"


def truncated(root, meta):
    path = root / "imagesTr" / "case_2.nii.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:500]))
    return "case_2.nii.gz: unreadable, truncated file"


def not_an_image(root, meta):
    (root / "labelsTr" / "case_3.nii.gz").write_bytes(gzip.compress(b"this is a text file, not a volume" * 20))
    return "case_3.nii.gz: unreadable"


def shape_mismatch(root, meta):
    write_case(root, "case_4", label=np.zeros((12, 12, 5), np.uint8))
    return "case_4.nii.gz: shape (12, 12, 5) differs from its image's (12, 12, 6)"


def affine_mismatch(root, meta):
    shifted = AFFINE.copy()
    shifted[0, 3] = 0.5
    write_case(root, "case_5", label_affine=shifted)
    return "case_5.nii.gz: affine differs from its image's by 0.5"


def nan_voxels(root, meta):
    image = np.ones((12, 12, 6), np.float32)
    image[0, 0, 0], image[1, 1, 1] = np.nan, np.inf
    write_case(root, "case_6", image=image)
    return "case_6.nii.gz: 2 NaN or Inf voxels"


def two_d(root, meta):
    write_case(root, "case_7", image=np.ones((12, 12), np.float32), label=np.zeros((12, 12, 1), np.uint8))
    return "case_7.nii.gz: a 2D volume"


def four_d(root, meta):
    write_case(root, "case_7", image=np.ones((12, 12, 6, 2), np.float32))
    return "case_7.nii.gz: a 4D volume (12, 12, 6, 2) where 3D is expected"


def undeclared_label(root, meta):
    label = np.zeros((12, 12, 6), np.uint8)
    label[0, 0, 0] = 7
    write_case(root, "case_1", label=label)
    return "case_1.nii.gz: label values [7] outside the declared classes 0..2"


def non_integer_label(root, meta):
    write_case(root, "case_2", label=np.full((12, 12, 6), 0.5, np.float32))
    return "case_2.nii.gz: non-integer label values"


def missing_file(root, meta):
    (root / "labelsTr" / "case_3.nii.gz").unlink()
    return "labelsTr/case_3.nii.gz: listed in"


def malformed_json(root, meta):
    (root / "dataset.json").write_text('{"labels": {"0": "background"')
    return "dataset.json: not a valid MSD dataset.json (JSONDecodeError"


def incomplete_json(root, meta):
    (root / "dataset.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "modality"}))
    return "dataset.json: not a valid MSD dataset.json (KeyError: 'modality')"


def escaping_path(root, meta):
    meta["training"][0]["image"] = "../outside.nii.gz"
    meta["training"][1]["label"] = str(root / "labelsTr" / "case_1.nii.gz")  # absolute
    (root / "dataset.json").write_text(json.dumps(meta))
    return "escapes the data root"


def duplicate_ids(root, meta):
    meta["training"].append(dict(meta["training"][0]))
    (root / "dataset.json").write_text(json.dumps(meta))
    return "dataset.json: case id case_0 listed twice"


def too_few_cases(root, meta):
    meta["training"] = meta["training"][:1]
    (root / "dataset.json").write_text(json.dumps(meta))
    return "1 cases are too few for split"


ROWS = [corrupt_gzip, truncated, not_an_image, shape_mismatch, affine_mismatch, nan_voxels, two_d, four_d,
        undeclared_label, non_integer_label, missing_file, malformed_json, incomplete_json, escaping_path,
        duplicate_ids, too_few_cases]


def test_a_clean_dataset_has_no_faults(dataset):
    report = faults_of(dataset[0])
    assert len(report.pop("dataset").cases) == 8  # the reading training hands on to its completion
    assert report == {"cases": 8, "faults": [], "empty": [], "warnings": []}


@pytest.mark.parametrize("fault", ROWS, ids=[f.__name__ for f in ROWS])
def test_each_fault_is_found_and_named(fault, dataset):
    root, meta = dataset
    expected = fault(root, meta)
    faults = faults_of(root)["faults"]
    assert any(expected in f for f in faults), faults
    assert len(faults) <= 2, faults  # the fault itself (two for escaping_path), nothing spurious


def test_fewer_cases_than_folds_is_a_fault(dataset):
    assert any("8 cases are too few for 10 folds" in f
               for f in faults_of(dataset[0], ["data.fold=0", "data.split.folds=10"])["faults"])


def test_an_empty_label_is_allowed_and_counted(dataset):
    root, _ = dataset
    write_case(root, "case_3", label=np.zeros((12, 12, 6), np.uint8))
    report = faults_of(root)
    assert report["faults"] == [] and [p.split("/")[-1] for p in report["empty"]] == ["case_3.nii.gz"]


def test_check_cli_reports_every_fault_at_once_and_train_refuses_in_one_line(dataset, tmp_path):
    root, meta = dataset
    nan_voxels(root, meta)
    missing_file(root, meta)
    done = subprocess.run([sys.executable, "-m", "pipeline.check", "data=msd", f"data.root={root}"],
                          capture_output=True, text=True, cwd=project_root())
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "8 cases, 2 faults" in done.stdout

    run_dir = tmp_path / "run"
    train = subprocess.run([sys.executable, "-m", "pipeline.train", "data=msd", f"data.root={root}", "tracking=none",
                            f"hydra.run.dir={run_dir}"], capture_output=True, text=True, cwd=project_root())
    assert train.returncode == 1
    last = train.stderr.strip().splitlines()[-1]
    assert (last.startswith("error: ") and "(and 1 more: python -m pipeline.check" in last
            and "Traceback" not in train.stderr)
    assert not (run_dir / "checkpoints").exists()  # no partial output


def test_a_library_error_inside_ours_keeps_its_first_line_only():
    assert first_line(ValueError("  bad header\nat offset 352\n")) == "bad header"
    assert first_line(RuntimeError("x" * 500)) == "x" * 200
    assert first_line(OSError()) == "OSError"  # an empty message still names something


def test_out_of_memory_and_bugs_stop_an_entry_point_in_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    """A CUDA out-of-memory cannot be made on these machines: the real exception type is raised from the wrapped
    entry point instead."""
    from omegaconf import OmegaConf

    from pipeline.core.errors import exit_on_input_error

    def entry(error):
        @exit_on_input_error
        def main(cfg):
            raise error
        return main

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    with pytest.raises(SystemExit) as stop:
        entry(oom)(OmegaConf.create({"debug": False}))
    assert str(stop.value) == ("error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); lower "
                               "data.batch_size or data.patch_size (training), sw_batch_size or set "
                               "stitch_device=cpu (inference)")
    with pytest.raises(SystemExit) as stop:
        entry(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9 GB"))(
            OmegaConf.create({"debug": False}))
    assert str(stop.value).startswith("error: out of memory (DefaultCPUAllocator: not enough memory")
    with pytest.raises(SystemExit) as stop:
        entry(KeyError("spacing"))(OmegaConf.create({"debug": False}))
    assert str(stop.value) == "error: KeyError: 'spacing' (debug=true shows the traceback)"
    with pytest.raises(KeyError):  # debug=true: the exception itself, with its traceback
        entry(KeyError("spacing"))(OmegaConf.create({"debug": True}))


def test_a_bug_keeps_its_traceback_in_the_run_log_and_the_console_says_where(tmp_path):
    """Hydra's job logging writes <run>/<task>.log through a FileHandler: the bug's traceback goes there, the console
    gets one line naming the file."""
    import logging

    from omegaconf import OmegaConf

    from pipeline.core.errors import exit_on_input_error

    @exit_on_input_error
    def main(cfg):
        return {}["spacing"]

    log = tmp_path / "train.log"
    handler = logging.FileHandler(log)
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(SystemExit) as stop:
            main(OmegaConf.create({"debug": False}))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert str(stop.value) == f"error: KeyError: 'spacing' (traceback in {log})"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and 'return {}["spacing"]' in text
