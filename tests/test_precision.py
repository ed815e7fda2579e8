"""The label check of a reduced precision against fp32, on a real hippocampus case."""

import numpy as np
import torch
from omegaconf import OmegaConf

from pipeline.evaluation.precision import AGREES, TRUTH_DROP, label_check
from pipeline.inference.predictor import Predictor
from pipeline.models import checkpoint
from pipeline.training.completion import complete
from tests.conftest import shared_dataset, tiny_config


def random_conv_ckpt(tiny_phantom, tmp_path):
    """A 3x3x3 convolution with random weights, 2 classes: its near-ties are what a lower precision flips."""
    cfg = tiny_config(tiny_phantom, tmp_path)
    complete(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["model"] = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 3,
                       "padding": 1}
    config["data"]["num_classes"], config["data"]["in_channels"] = 2, 1
    torch.manual_seed(0)
    return checkpoint.save(tmp_path / "conv.pt", torch.nn.Conv3d(1, 2, 3, padding=1), config)


def test_the_label_check_compares_a_reduced_precision_with_fp32_class_by_class(tiny_phantom, tmp_path):
    root = shared_dataset("msd_hippocampus")
    cases = [(root / "imagesTr" / f"{c}.nii.gz", root / "labelsTr" / f"{c}.nii.gz")
             for c in ("hippocampus_001", "hippocampus_003")]
    ckpt = random_conv_ckpt(tiny_phantom, tmp_path)
    bundles = {ckpt: checkpoint.load(ckpt)}
    same = label_check(bundles, cases, amp=False, tta=True)  # fp32 against itself: every voxel agrees
    assert same["agreement"] == {"organ": 1.0} and same["holds"] and same["cases"] == 2
    assert same["truth_dice"]["fp32"] == same["truth_dice"][False]

    check = label_check(bundles, cases, amp="bf16", tta=True)
    fp32, bf16 = (Predictor(bundles, amp=a, backend="torch", tta=True) for a in (False, "bf16"))
    a, b = zip(*((fp32(image)[0], bf16(image)[0]) for image, _ in cases))
    a, b = np.concatenate([x.ravel() for x in a]) == 1, np.concatenate([x.ravel() for x in b]) == 1
    assert check["precision"] == "bf16"
    assert abs(check["agreement"]["organ"] - 2 * (a & b).sum() / (a.sum() + b.sum())) < 1e-6  # by hand
    assert 0.9 < check["agreement"]["organ"] < 1  # bf16 flips some of a random network's near-ties
    drop = check["truth_dice"]["fp32"] - check["truth_dice"]["bf16"]
    assert check["holds"] == (check["agreement"]["organ"] >= AGREES and drop <= TRUTH_DROP)
