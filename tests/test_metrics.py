"""Dice and IoU from MONAI metrics against values computed by hand."""

import math

import pytest
import torch

from pipeline.evaluation.metrics import SegmentationScores


def volume(*boxes) -> torch.Tensor:
    """A (1, 1, 10, 10, 10) label map with `value` painted into each box (x0, x1, value)."""
    v = torch.zeros(1, 1, 10, 10, 10)
    for x0, x1, value in boxes:
        v[0, 0, x0:x1, :2, :2] = value  # 4 voxels per x index
    return v


def test_dice_and_iou_match_hand_computed_values():
    scores = SegmentationScores(["background", "organ", "lesion"])
    label = volume((0, 4, 1), (6, 8, 2))  # organ: 16 voxels, lesion: 8 voxels
    pred = volume((2, 6, 1), (6, 8, 2))   # organ: 16 voxels, 8 overlapping; lesion exact
    scores.update(pred, label)
    out = scores.compute()
    assert out["val_dice_organ"] == pytest.approx(2 * 8 / (16 + 16))  # 0.5
    assert out["val_iou_organ"] == pytest.approx(8 / (16 + 16 - 8))  # 1/3
    assert out["val_dice_lesion"] == pytest.approx(1.0)
    assert out["val_iou_lesion"] == pytest.approx(1.0)
    assert out["val_dice_mean"] == pytest.approx(0.75)
    assert out["val_iou_mean"] == pytest.approx((1 / 3 + 1) / 2)


def test_scores_average_over_volumes_and_skip_absent_classes():
    scores = SegmentationScores(["background", "organ", "lesion"])
    scores.update(volume((0, 4, 1)), volume((0, 4, 1)))  # organ perfect; no lesion anywhere: no lesion score
    scores.update(volume((0, 2, 1)), volume((0, 4, 1)))  # organ: 8 of 16 found -> dice 2*8/24
    out = scores.compute()
    assert out["val_dice_organ"] == pytest.approx((1 + 16 / 24) / 2)
    assert math.isnan(out["val_dice_lesion"])
    assert out["val_dice_mean"] == pytest.approx(out["val_dice_organ"])  # nan classes have no vote
    # compute() resets: the next epoch starts clean
    scores.update(volume((0, 4, 1)), volume((0, 4, 1)))
    assert scores.compute()["val_dice_organ"] == pytest.approx(1.0)
