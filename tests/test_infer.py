"""Inference lands on the input's exact grid, whatever its orientation, and never overwrites its input."""

import json
import os
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline import project_root
from pipeline.core.errors import InputError, RunStopped
from pipeline.inference.predictor import Predictor, infer
from pipeline.models import checkpoint
from pipeline.training.run import train
from tests.conftest import hippocampus_subset, tiny_config


def oblique_affine() -> np.ndarray:
    """Non-RAS, non-identity: axes permuted and flipped, rotated 30 degrees, anisotropic, shifted origin."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    permute_flip = np.array([[0, -1, 0], [1, 0, 0], [0, 0, -1]])  # voxel i -> world y, j -> -x, k -> -z
    affine = np.eye(4)
    affine[:3, :3] = rotation @ permute_flip @ np.diag([0.8, 1.2, 3.0])
    affine[:3, 3] = [12.5, -30.25, 7.0]
    return affine


def write_volume(path, shape=(21, 26, 11), seed=0) -> nib.Nifti1Image:
    rng = np.random.default_rng(seed)
    data = rng.normal(size=shape).astype(np.float32)
    data[5:15, 3:10, 2:8] += 4.0  # a bright block makes the volume asymmetric in every axis
    image = nib.Nifti1Image(data, oblique_affine())
    nib.save(image, path)
    return nib.load(path)


def test_label_map_keeps_an_oblique_affine_and_every_voxel_in_place(threshold_ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    src = write_volume(tmp_path / "in" / "case.nii.gz")
    [out] = infer(threshold_ckpt(), tmp_path / "in", tmp_path / "out", amp=False)["written"]
    pred = nib.load(out)
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-6)
    assert pred.get_data_dtype() == np.uint8
    expected = src.get_fdata() > src.get_fdata().mean()  # what the threshold net sees after z-scoring
    np.testing.assert_array_equal(np.asarray(pred.dataobj), expected.astype(np.uint8))


def test_compiled_network_gives_the_same_labels_and_cpu_inference_defaults_to_fp32(threshold_ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    src = write_volume(tmp_path / "in" / "case.nii.gz")
    [out] = infer(threshold_ckpt(), tmp_path / "in", tmp_path / "out", compile=True)["written"]  # amp=auto
    expected = src.get_fdata() > src.get_fdata().mean()
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), expected.astype(np.uint8))
    bundle = {tmp_path / "t.pt": checkpoint.load(threshold_ckpt())}
    assert Predictor(bundle).dtype is None and Predictor(bundle, amp="bf16").dtype == torch.bfloat16


@pytest.mark.slow  # an OpenVINO compile: `make test-slow`
def test_auto_backend_runs_openvino_on_a_cpu_in_fp32_with_the_labels_of_torch(tiny_phantom, tmp_path):
    train(tiny_config(tiny_phantom, tmp_path, overrides=["tracking=none", "trainer.max_epochs=3", "optimizer.lr=0.01"]))
    ckpt = tmp_path / "checkpoints" / "best.pt"
    bundle = {ckpt: checkpoint.load(ckpt)}
    auto = Predictor(bundle)
    assert auto.backend == "openvino" and auto.dtype is None
    assert Predictor(bundle, compile=True).backend == "torch"  # compile asks for torch; so does a half precision
    assert Predictor(bundle, amp="bf16").backend == "torch"
    eager = Predictor(bundle, backend="torch", channels_last=False)  # plain fp32 NCDHW torch: the reference
    for image in sorted((tiny_phantom / "imagesTr").glob("*.nii.gz"))[:2]:
        ours, ref = auto(image)[0], eager(image)[0]
        assert ours.shape == ref.shape and (ours == ref).mean() >= 0.999
        for k in np.unique(ref)[1:]:  # every class the reference finds, by Dice
            dice = 2 * ((ours == k) & (ref == k)).sum() / ((ours == k).sum() + (ref == k).sum())
            assert dice >= 0.999, (image.name, k, dice)


def test_resampling_is_inverted_onto_the_input_grid(threshold_ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    src = write_volume(tmp_path / "in" / "case.nii")
    [out] = infer(threshold_ckpt(["data.spacing=[1.5,1.5,1.5]"]), tmp_path / "in" / "case.nii", tmp_path / "out",
                  amp=False)["written"]
    pred = nib.load(out)
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-6)
    expected = src.get_fdata() > src.get_fdata().mean()
    block = np.zeros(src.shape, bool)
    block[6:14, 4:9, 3:7] = True  # the bright block's interior survives resampling there and back
    assert np.asarray(pred.dataobj)[block].all() and (np.asarray(pred.dataobj) == expected).mean() > 0.7


def test_refuses_to_overwrite_its_input(threshold_ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    write_volume(tmp_path / "in" / "case.nii.gz")
    before = (tmp_path / "in" / "case.nii.gz").read_bytes()
    with pytest.raises(InputError, match="overwrite the input"):
        infer(threshold_ckpt(), tmp_path / "in", tmp_path / "in")
    assert (tmp_path / "in" / "case.nii.gz").read_bytes() == before


def run_infer_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.infer", *args],
                          capture_output=True, text=True, cwd=project_root())


@pytest.mark.slow  # CLI processes (the README quickstart runs the same path): `make test-slow`
def test_cli_on_a_trained_checkpoint_and_on_a_missing_one(tiny_phantom, tmp_path):
    train(tiny_config(tiny_phantom, tmp_path, overrides=["tracking=none"]))
    images = tiny_phantom / "imagesTr"
    done = run_infer_cli(f"ckpt={tmp_path}/checkpoints/best.pt", f"input={images}", f"output={tmp_path}/pred")
    assert done.returncode == 0, done.stderr
    for src in sorted(images.iterdir()):
        pred, ref = nib.load(tmp_path / "pred" / src.name), nib.load(src)  # same name: .nii.gz in, .nii.gz out
        assert pred.shape == ref.shape and np.abs(pred.affine - ref.affine).max() < 1e-6
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}

    failed = run_infer_cli(f"ckpt={tmp_path}/nope.pt", f"input={images}", f"output={tmp_path}/pred2")
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1] == f"error: {tmp_path}/nope.pt: checkpoint not found"
    assert not (tmp_path / "pred2").exists()


def test_hippocampus_checkpoint_predicts_on_the_input_grid(tmp_path):
    """The issue's acceptance path on real MRI: train via data.root on MSD hippocampus, infer, same affine."""
    subset = hippocampus_subset(tmp_path / "hippo", 8)
    image = subset / json.loads((subset / "dataset.json").read_text())["training"][-1]["image"]
    cfg = tiny_config(subset, tmp_path, overrides=["experiment=hippocampus", "tracking=none", "trainer.max_epochs=1",
                                                   "data.batch_size=2"])
    train(cfg)
    [out] = infer(tmp_path / "checkpoints" / "best.pt", image, tmp_path / "pred")["written"]
    pred, ref = nib.load(out), nib.load(image)
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-6)


def test_an_interrupted_folder_run_says_how_many_it_wrote_and_a_rerun_skips_them(threshold_ckpt, tmp_path,
                                                                                  monkeypatch):
    """A real SIGINT to this process after the second volume: the run stops before the third."""
    from pipeline.inference import predictor as inference

    ckpt, images, out = threshold_ckpt(), tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for i in range(5):
        write_volume(images / f"case{i}.nii.gz", seed=i)
    predict_one, written = inference.predict_one, []

    def predict_then_interrupt(*args, **kwargs):
        predict_one(*args, **kwargs)
        written.append(args[1])
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(inference, "predict_one", predict_then_interrupt)
    with pytest.raises(RunStopped) as stop:
        infer(ckpt, images, out)
    assert stop.value.code == 130
    assert str(stop.value) == f"interrupted after 2 of 5 volumes (2 written to {out}); a re-run skips them"
    # whole files, no temp ones; beside them the record of the path that made them
    assert sorted(p.name for p in out.iterdir()) == ["case0.nii.gz", "case1.nii.gz", "predicted_with.json"]
    record = json.loads((out / "predicted_with.json").read_text())
    assert record["volumes"] == {"case0.nii.gz": 0, "case1.nii.gz": 0} and len(record["runs"]) == 1
    run = record["runs"][0]
    assert run["checkpoints"] == [str(ckpt)] and run["precision"] == "fp32" and run["tta_mirrors"] == [[]]
    assert run["backend"] in ("openvino", "torch") and run["backend_why"].startswith("auto: ")
    monkeypatch.undo()
    report = infer(ckpt, images, out)
    assert [p.name for p in report["skipped"]] == ["case0.nii.gz", "case1.nii.gz"] and len(report["written"]) == 3
    record = json.loads((out / "predicted_with.json").read_text())  # the skipped two keep the first run's entry
    assert len(record["runs"]) == 2 and record["volumes"] == {f"case{i}.nii.gz": int(i > 1) for i in range(5)}
