"""Exported networks run without this package and agree with PyTorch."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import onnxruntime
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipeline import project_root
from pipeline.export import export
from pipeline.inference.predictor import infer
from pipeline.models import checkpoint
from pipeline.models.adapters import for_inference
from pipeline.models.export import build_model, export_model
from pipeline.training.run import train
from tests.conftest import TINY_MODEL, compose_config, hippocampus_subset, tiny_config


def dice(a: np.ndarray, b: np.ndarray) -> float:
    scores = [2 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum()) for c in np.union1d(a, b) if c]
    return float(np.mean(scores))


@pytest.mark.slow  # two exports and their runtimes: `make test-slow`
def test_onnx_and_torchscript_exports_agree_with_pytorch(tiny_phantom, tmp_path):
    train(tiny_config(tiny_phantom, tmp_path, overrides=["tracking=none", "trainer.max_epochs=2"]))
    ckpt = tmp_path / "checkpoints" / "best.pt"
    done = subprocess.run([sys.executable, "-m", "pipeline.export", f"ckpt={ckpt}", "format=onnx"],
                          capture_output=True, text=True, cwd=project_root())
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "best.json").exists()
    assert export(ckpt, "torchscript") == tmp_path / "checkpoints" / "best.ts"  # in this process: a start costs ~10 s

    model = build_model(checkpoint.load(ckpt))
    x = torch.randn(2, 1, 32, 32, 16)
    scripted = torch.jit.load(str(tmp_path / "checkpoints" / "best.ts"))
    torch.testing.assert_close(scripted(x), model(x), atol=1e-4, rtol=1e-4)

    images = tmp_path / "images"  # two volumes keep it quick
    images.mkdir()
    for name in ("phantom_000.nii.gz", "phantom_001.nii.gz"):
        (images / name).symlink_to(tiny_phantom / "imagesTr" / name)
    ref = infer(ckpt, images, tmp_path / "torch", amp=False)["written"]
    ort = infer(ckpt, images, tmp_path / "ort", backend="onnxruntime")["written"]
    for a, b in zip(ref, ort):
        la, lb = np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj)
        assert (la == lb).mean() > 0.999 and dice(la, lb) >= 0.999


@pytest.mark.parametrize("model", ["dynunet", "unetpp", "unet_valid", "attention_unet", "unetr"])
def test_every_kind_of_network_exports_to_onnx_as_inference_runs_it(model, tmp_path):
    """Deep supervision, mirror-padded valid convolutions, batch norm, transformers: ONNX Runtime gives PyTorch's
    logits."""
    overrides = [f"model={model}", "data.in_channels=1", "data.num_classes=3", "data.patch_size=[32,32,16]",
                 *TINY_MODEL[model]]
    cfg = compose_config("train", overrides + (["model.deep_supervision=true"] if model == "unetpp" else []), tmp_path)
    net = for_inference(instantiate(cfg.model))
    path = export_model(net, OmegaConf.to_container(cfg, resolve=True), "onnx", tmp_path / "net.onnx")
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        expected = net(x).numpy()  # after the export too, the network is still in eval mode
    got = onnxruntime.InferenceSession(str(path)).run(None, {"image": x.numpy()})[0]
    assert got.shape == (2, 3, 32, 32, 16)
    np.testing.assert_allclose(got, expected, atol=1e-4)


# `python -m monai.bundle <command> ...`, reporting at exit which modules of this package the run imported
MONAI_BUNDLE = ("import atexit, runpy, sys\n"
                "atexit.register(lambda: print('imported from pipeline:', sorted(m for m in sys.modules"
                " if m.split('.')[0] == 'pipeline')))\n"
                "sys.argv = ['monai.bundle', *sys.argv[1:]]\n"
                "runpy.run_module('monai.bundle', run_name='__main__', alter_sys=True)\n")
SCHEMA = project_root() / "tests" / "assets" / "bundle_metadata_schema.json"


def monai_bundle(*args, cwd) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", MONAI_BUNDLE, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported from pipeline: []" in done.stdout  # MONAI alone ran it
    return done


@pytest.mark.slow  # a MONAI bundle run by MONAI alone (~30 s on the phantom, ~60 s on hippocampus)
@pytest.mark.parametrize("data", ["phantom", "hippocampus"])
def test_a_monai_bundle_runs_in_monai_alone_and_labels_as_pipeline_infer(data, tiny_phantom, tmp_path):
    """Our own network (conv3d) on the phantom, MONAI's DynUNet (experiment=hippocampus) on real MRI."""
    if data == "phantom":
        root, model, overrides = tiny_phantom, "conv3d", ["trainer.max_epochs=1"]
    else:
        root, model = hippocampus_subset(tmp_path / "hippo", 8), "dynunet"
        overrides = ["experiment=hippocampus", "data.batch_size=2", "trainer.max_minutes=null", "trainer.max_epochs=1"]
    train(tiny_config(root, tmp_path / "run", model=model, overrides=["tracking=none", *overrides]))
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    bundle = export(ckpt, "bundle", tmp_path / "bundle")
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()) == [
        "configs/inference.json", "configs/metadata.json", "docs/README.md", "models/model.pt", "models/model.ts"]
    images = tmp_path / "images"
    images.mkdir()
    for case in sorted((root / "imagesTr").iterdir())[:2]:
        (images / case.name).symlink_to(case)

    monai_bundle("run", "--config_file", bundle / "configs" / "inference.json", "--bundle_root", bundle,
                 "--dataset_dir", images, "--output_dir", tmp_path / "bundle_out", cwd=tmp_path)
    infer(ckpt, images, tmp_path / "pipeline_out")
    for case in sorted(images.iterdir()):
        ours = nib.load(tmp_path / "pipeline_out" / case.name)
        theirs = nib.load(tmp_path / "bundle_out" / case.name.replace(".nii.gz", "_seg.nii.gz"))
        a, b = np.asarray(ours.dataobj), np.asarray(theirs.dataobj)
        assert a.shape == b.shape and np.abs(ours.affine - theirs.affine).max() < 1e-6
        for c in range(1, 3):
            both = (a == c).sum() + (b == c).sum()
            assert both > 0 and 2 * ((a == c) & (b == c)).sum() / both >= 0.999, (case.name, c)

    if data == "phantom":  # the metadata against the bundle specification's mandatory keys (offline: see SCHEMA)
        meta = bundle / "configs" / "metadata.json"
        done = monai_bundle("verify_metadata", "--meta_file", meta, "--filepath", SCHEMA, cwd=tmp_path)
        assert "metadata is verified with no error" in done.stdout + done.stderr
        from monai.bundle import verify_metadata

        broken = tmp_path / "broken.json"
        broken.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "task"}))
        with pytest.raises(ValueError):
            verify_metadata(meta_file=str(broken), filepath=str(SCHEMA))
