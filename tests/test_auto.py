"""experiment=auto, one planned recipe for any dataset: real files as distributed, the plans it makes for the IBSR18
brains and the hippocampus crops, and a short training that learns and records its plan."""

import json
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose
from omegaconf import OmegaConf

from pipeline.core import hardware
from pipeline.core.rundir import RunDir
from pipeline.data.checks import check, check_case
from pipeline.data.io import ras_spacing, read_array
from pipeline.data.sources import detect_layout
from pipeline.data.transforms import preprocess
from pipeline.inference.predictor import infer
from pipeline.training import planning
from pipeline.training.completion import complete
from pipeline.training.run import train
from tests.conftest import compose_config, shared_dataset, shared_subset


def test_a_volume_shipped_as_x_y_z_1_with_a_zero_fourth_zoom_is_one_3d_volume(tmp_path):
    affine = np.diag([0.9, 1.5, 0.9, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 2.0]
    image = np.random.default_rng(0).normal(100, 20, (12, 8, 10, 1)).astype(np.float32)
    label = (image > 100).astype(np.uint8)
    case = {}
    for key, data in (("image", image), ("label", label)):
        nifti = nib.Nifti1Image(data, affine)
        nifti.header.set_zooms((0.9, 1.5, 0.9, 0.0))  # as IBSR18 ships its files
        nib.save(nifti, tmp_path / f"{key}.nii.gz")
        case[key] = str(tmp_path / f"{key}.nii.gz")
    assert nib.load(case["image"]).header.get_zooms()[3] == 0

    array, read_affine = read_array(case["image"])
    assert array.shape == (12, 8, 10) and np.allclose(read_affine, affine, atol=1e-6)
    assert check_case(case, num_classes=2, channels=1) == ([], False)  # no "4D volume where 3D is expected"
    loaded = Compose(preprocess(compose_config("train", run_dir=tmp_path)))(dict(case))  # the pipeline's own loading
    assert loaded["image"].shape == loaded["label"].shape == (1, 12, 8, 10)
    assert np.allclose(loaded["image"].affine.numpy(), affine, atol=1e-6)
    assert np.array_equal(loaded["label"][0].numpy(), label[..., 0])


def test_the_ibsr18_files_pass_the_check_as_distributed(tmp_path):
    root = shared_dataset("ibsr18_brain_tissue")
    report = check(compose_config("train", ["experiment=auto", f"data.root={root}"], tmp_path), progress=False)
    assert (report["cases"], report["faults"], report["empty"]) == (10, [], [])
    array, affine = read_array(root / "imagesTr" / "IBSR_07.nii.gz")  # the 1.0 x 1.5 x 1.0 mm scanner group
    assert array.shape == (256, 128, 256)
    assert np.allclose(ras_spacing(affine), [1.0, 1.5, 1.0], atol=1e-6)


def test_the_layout_is_detected_from_the_dataset_json(tmp_path):
    assert detect_layout(tmp_path) == "folders"  # no dataset.json: <root>/images with <root>/labels
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "T1"}, "labels": {"0": "background"}}))
    assert detect_layout(tmp_path) == "msd"
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0}}))
    assert detect_layout(tmp_path) == "nnunet"


def test_the_auto_plan_for_the_ibsr18_brains(tmp_path, monkeypatch):
    root = shared_dataset("ibsr18_brain_tissue")
    timed = []  # a 32-wide step "takes" 3 s here: 30 minutes hold 600 steps, under planning.MIN_STEPS
    monkeypatch.setattr(planning, "step_seconds", lambda model, shape, *_: timed.append(shape) or 3.0)
    cfg = compose_config("train", ["experiment=auto", f"data.root={root}"], tmp_path)
    splits = complete(cfg).splits
    # 10 cases: none held back for test, every case trains the final model (cross-validation is the estimate)
    assert cfg.data.split.test == 0 and splits["test"] == [] and len(splits["train"]) == 10 and cfg.data.fold == "all"
    assert list(cfg.data.spacing) == [0.9375, 1.5, 0.9375]  # the median grid of three scanner groups: resampled to it
    # the brain's nonzero box is about a third of the volume: cropped to it, z-scored over its nonzero voxels
    assert cfg.transforms.crop._target_ == "monai.transforms.CropForegroundd"
    assert cfg.transforms.normalize.nonzero is True
    assert list(cfg.data.patch_size) == [72, 56, 64] and cfg.data.batch_size == 2  # 258 k voxels of the 262 k budget
    assert cfg.model.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 2]]  # 1.5 mm is within 2x of 0.94
    assert cfg.model.kernel_size == [[3, 3, 3]] * 5
    assert timed == [(2, 1, 72, 56, 64)]  # one step of the planned batch and patch was timed
    assert list(cfg.model.filters) == [16, 32, 64, 128, 256]
    assert list(cfg.transforms.augment.affine.rotate_range) == [0.26] * 3  # near-isotropic: about every axis
    # a machine that runs the step in 1 s trains 1800 steps in the 30 minutes: nnU-Net's width
    monkeypatch.setattr(planning, "step_seconds", lambda *_: 1.0)
    faster = compose_config("train", ["experiment=auto", f"data.root={root}"], tmp_path)
    complete(faster)
    assert list(faster.model.filters) == [32, 64, 128, 256, 320]


def test_one_training_step_is_timed_in_the_training_precision():
    model = torch.nn.Conv3d(1, 2, 3, padding=1)
    seconds = planning.step_seconds(model, (2, 1, 16, 16, 16), hardware.resolve(False, torch.device("cpu")),
                                    torch.device("cpu"))
    assert 0 < seconds < 5 and model.weight.grad is not None  # forward and backward ran


def test_the_hippocampus_recipe_is_the_auto_recipe_with_its_measured_overrides_and_test_split(tmp_path):
    root = shared_dataset("msd_hippocampus")
    final = compose_config("train", ["experiment=hippocampus", f"data.root={root}"], tmp_path)
    auto = compose_config("train", ["experiment=auto", f"data.root={root}", "plan.base_filters=32",
                                    "transforms.augment.flip_y=null", "transforms.augment.flip_z=null",
                                    "trainer.max_minutes=20", "data.split.test=0.15"], tmp_path)
    assert OmegaConf.to_container(final) == OmegaConf.to_container(auto)
    splits = complete(final).splits
    # crops with tissue everywhere: no crop, whole-volume z-score, the median case whole in one patch
    assert final.transforms.crop is None and final.transforms.normalize.nonzero is False
    assert list(final.data.patch_size) == [40, 56, 40] and list(final.data.spacing) == [1.0, 1.0, 1.0]
    assert len(splits["test"]) == 31 and len(splits["train"]) == 177  # 208 cases: 15% held back for test
    assert list(final.model.filters) == [32, 64, 128, 256]


@pytest.mark.slow  # two whole brains trained (~2 min alone): `make test-slow`
def test_a_short_auto_training_on_two_ibsr_brains_learns_and_records_its_plan(tmp_path, mlflow_store):
    subset = shared_subset("ibsr18_brain_tissue", tmp_path / "ibsr", 2)
    cfg = compose_config("train", [
        "experiment=auto", f"data.root={subset}", "plan.base_filters=8", "data.batch_size=1",
        "transforms.patch.num_samples=2", "trainer.max_minutes=null", "trainer.max_epochs=8", "trainer.val_every=1",
        "trainer.inferer.sw_batch_size=8"], tmp_path)
    result = train(cfg)
    history = result["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_dice_mean"] > history[0]["val_dice_mean"] + 0.1, [h["val_dice_mean"] for h in history]

    plans = json.loads(RunDir(tmp_path).plans.read_text())
    assert plans["dataset"]["cases"] == {"train": 2, "val": 1, "test": 0} and plans["dataset"]["fold"] == "all"
    assert plans["preprocessing"]["crop"] == "monai.transforms.CropForegroundd"
    assert plans["patch_size"] == list(cfg.data.patch_size) and plans["network"]["filters"][0] == 8
    assert plans["augmentation"]["mirror_axes"] == [0, 1, 2]
    assert "rotate90" not in plans["augmentation"]["transforms"]  # what runs: the 72x56x64 patch is not square
    logged = [a.path for a in mlflow.MlflowClient(mlflow_store).list_artifacts(result["run_id"])]
    assert "plans.json" in logged

    # whole-brain inference: the crop is undone, the label map lies on the input's own grid
    image = subset / "imagesTr" / "IBSR_01.nii.gz"
    [out] = infer(RunDir(tmp_path).last, image, tmp_path / "pred")["written"]
    pred, source = nib.load(out), nib.load(image)
    assert pred.shape == (256, 128, 256) and np.allclose(pred.affine, source.affine, atol=1e-6)
    labels, brain = np.asarray(pred.dataobj), np.argwhere(np.asarray(source.dataobj)[..., 0] != 0)
    outside = np.ones(labels.shape, bool)
    outside[tuple(slice(lo, hi + 1) for lo, hi in zip(brain.min(0), brain.max(0)))] = False
    assert outside.sum() > 0.5 * labels.size and not labels[outside].any()  # the cropped-off border: background
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and (labels == 3).sum() > 10_000  # white matter found


def ct_folder_pairs(folder: Path) -> Path:
    """TotalSegmentator's two NIfTI CTs (Hounsfield units) as folder pairs, no dataset.json: nothing declares CT."""
    source = shared_dataset("totalseg_ct_examples")
    for name, label in (("example_ct", "example_seg_fast_force_split"), ("example_ct_sm", "example_seg")):
        for sub, target in (("images", name), ("labels", label)):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            (folder / sub / f"{name}.nii.gz").symlink_to(source / f"{target}.nii.gz")
    return folder


def test_the_auto_plan_recognises_ct_in_folder_pairs_by_its_hounsfield_units(tmp_path):
    root = ct_folder_pairs(tmp_path / "ct")
    cfg = compose_config("train", ["experiment=auto", f"data.root={root}", "plan.base_filters=16"], tmp_path)
    complete(cfg)
    assert cfg.data.num_classes == 118 and cfg.data.class_names[117] == "class117"  # the largest label value, 117
    norm = cfg.transforms.normalize  # nnU-Net's CT normalization: the foreground's 0.5-99.5 percentiles
    assert norm._target_ == "monai.transforms.ScaleIntensityRanged" and -1000 < norm.a_min < 0 < norm.a_max < 3000
    assert cfg.transforms.crop is None  # air is -1000, not 0: the whole field of view is nonzero
    assert list(cfg.data.spacing) == [3.0, 3.0, 3.0]  # both CTs' grid: another (the DICOM's 0.98 mm) is resampled
