"""Exported networks run without this package and agree with PyTorch."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import onnxruntime
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipeline import checkpoint, project_root
from pipeline.inference import infer
from pipeline.models.adapters import for_inference
from pipeline.models.export import build_model, export, export_model
from pipeline.training import train
from tests.conftest import TINY_MODEL, compose_config, tiny_config


def dice(a: np.ndarray, b: np.ndarray) -> float:
    scores = [2 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum()) for c in np.union1d(a, b) if c]
    return float(np.mean(scores))


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
