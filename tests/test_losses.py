"""The hand-written losses (training/losses.py) against values worked out by hand, and every new loss config."""

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from monai.losses import GeneralizedDiceLoss, TverskyLoss

from pipeline.training.losses import (
    BCETotalVariationLoss,
    BinaryCrossEntropyLoss,
    WeightedCrossEntropyLoss,
    inverse_frequency_weights,
    total_variation,
)
from tests.conftest import compose_config


def nll(z: float) -> float:
    """-log sigmoid(z): the cross-entropy of a voxel whose true class leads the other by logit margin z."""
    return -math.log(1 / (1 + math.exp(-z)))


def approx(x: float):
    return pytest.approx(x, rel=1e-5, abs=1e-7)


# Two classes, four voxels on a 2x2 grid: class-0 logits 0, class-1 logits z, so p(class 1) = sigmoid(z).
Z = [2.0, -1.0, 0.0, 1.0]
LABEL = [1, 0, 0, 1]


def two_class(z=Z, label=LABEL):
    logits = torch.stack([torch.zeros(4), torch.tensor(z)]).view(1, 2, 2, 2)
    return logits, torch.tensor(label, dtype=torch.float32).view(1, 1, 2, 2)


# ---------------------------------------------------------------------------------------------------------------------
# WeightedCrossEntropyLoss and inverse_frequency_weights


def test_weighted_ce_is_the_weighted_mean_over_the_targets_weights():
    logits, label = two_class()
    # per voxel: y=1, z=2: -log s(2); y=0, z=-1: -log(1 - s(-1)) = -log s(1); y=0, z=0: log 2; y=1, z=1: -log s(1)
    per_voxel = [nll(2), nll(1), math.log(2), nll(1)]
    w0, w1 = 0.5, 5.0
    weights = [w1, w0, w0, w1]
    # torch's definition (and ours): sum_i w_{y_i} * ce_i / sum_i w_{y_i}, NOT / number of voxels
    expected = sum(w * c for w, c in zip(weights, per_voxel)) / (w1 + w0 + w0 + w1)  # / 11
    loss = WeightedCrossEntropyLoss([w0, w1])(logits, label)
    assert float(loss) == approx(expected)
    assert float(loss) != approx(sum(w * c for w, c in zip(weights, per_voxel)) / 4)
    # integer labels work the same
    assert float(WeightedCrossEntropyLoss([w0, w1])(logits, label.long())) == approx(expected)


def test_weighted_ce_with_unit_or_no_weights_is_plain_ce():
    logits, label = two_class()
    plain = sum([nll(2), nll(1), math.log(2), nll(1)]) / 4
    assert float(F.cross_entropy(logits, label[:, 0].long())) == approx(plain)
    assert float(WeightedCrossEntropyLoss([1.0, 1.0])(logits, label)) == approx(plain)
    assert float(WeightedCrossEntropyLoss()(logits, label)) == approx(plain)


def test_weighted_ce_on_an_all_background_label():
    logits, label = two_class(label=[0, 0, 0, 0])
    # every target weighs w0: the weighted mean is the plain mean of -log(1 - s(z)) = -log s(-z)
    expected = sum(nll(-z) for z in Z) / 4
    loss = WeightedCrossEntropyLoss([0.5, 5.0])(logits, label)
    assert math.isfinite(float(loss)) and float(loss) == approx(expected)


def test_weighted_ce_rejects_the_placeholder_and_a_wrong_number_of_weights():
    with pytest.raises(ValueError, match="placeholder"):
        WeightedCrossEntropyLoss("inverse_frequency")
    logits, label = two_class()
    with pytest.raises(ValueError, match="3 class weights for 2 output channels"):
        WeightedCrossEntropyLoss([1.0, 2.0, 3.0])(logits, label)


def test_inverse_frequency_weights_by_hand():
    # w_k = 1 / (K f_k): [1 / (2 * 0.9), 1 / (2 * 0.1)] = [0.5556, 5]; 0.9 * 0.5556 + 0.1 * 5 = 0.5 + 0.5 = 1
    w = inverse_frequency_weights([0.9, 0.1])
    assert w == [approx(1 / 1.8), approx(5.0)]
    assert 0.9 * w[0] + 0.1 * w[1] == approx(1.0)
    assert w[1] / w[0] == approx(9.0)  # inversely proportional to the frequencies


def test_inverse_frequency_weights_give_an_absent_class_zero():
    # K = 2 classes present: [1 / (2 * 0.8), 0, 1 / (2 * 0.2)] = [0.625, 0, 2.5]; 0.8 * 0.625 + 0.2 * 2.5 = 1
    assert inverse_frequency_weights([0.8, 0.0, 0.2]) == [approx(0.625), 0.0, approx(2.5)]


@pytest.mark.parametrize("bad, message", [
    ([0.0, 0.0], "all 0"),
    ([], "all 0"),
    ([1.1, -0.1], "non-negative"),
    ([float("nan"), 1.0], "finite"),
])
def test_inverse_frequency_weights_reject_invalid_frequencies(bad, message):
    with pytest.raises(ValueError, match=message):
        inverse_frequency_weights(bad)


# ---------------------------------------------------------------------------------------------------------------------
# BinaryCrossEntropyLoss and BCETotalVariationLoss


def test_bce_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.0, 3.0]).view(1, 1, 2, 2)
    label = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 2, 2)
    # y=1: -log s(z); y=0: -log(1 - s(z)) = -log s(-z)
    expected = (nll(2) + nll(1) + math.log(2) + nll(-3)) / 4
    assert float(BinaryCrossEntropyLoss()(logits, label)) == approx(expected)
    assert float(BinaryCrossEntropyLoss()(logits, label.long())) == approx(expected)


def test_bce_on_an_all_background_label():
    logits = torch.tensor([2.0, -1.0, 0.0, 3.0]).view(1, 1, 2, 2)
    expected = (nll(-2) + nll(1) + math.log(2) + nll(-3)) / 4
    loss = BinaryCrossEntropyLoss()(logits, torch.zeros(1, 1, 2, 2))
    assert math.isfinite(float(loss)) and float(loss) == approx(expected)


@pytest.mark.parametrize("cls", [BinaryCrossEntropyLoss, BCETotalVariationLoss])
def test_binary_losses_refuse_two_channels(cls):
    with pytest.raises(ValueError, match="expects one output channel \\(binary\\), got 2"):
        cls()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4))


def step_edge_2d() -> torch.Tensor:
    """Logits of a vertical step: p = sigmoid = 0.5 (logit 0) in columns 0-1, 0.75 (logit log 3) in columns 2-3."""
    return torch.tensor([[0.0, 0.0, math.log(3), math.log(3)]] * 2).view(1, 1, 2, 4)


def test_total_variation_of_a_step_edge():
    p = torch.sigmoid(step_edge_2d())
    assert p[0, 0, 0].tolist() == [approx(0.5), approx(0.5), approx(0.75), approx(0.75)]
    # along H: 1 x 4 pairs, all 0 -> mean 0; along W: 2 x 3 pairs, one per row differs by 0.25 -> 2 * 0.25 / 6 = 1/12
    assert float(total_variation(p)) == approx(1 / 12)
    # the same map as a 3D volume of depth 1: that axis has no pairs and adds nothing
    assert float(total_variation(p.unsqueeze(-1))) == approx(1 / 12)


def test_bce_tv_in_2d_is_bce_plus_weighted_tv():
    logits = step_edge_2d()
    label = (logits > 0).float()  # the edge is the true boundary
    # 4 voxels y=0, p=0.5: log 2; 4 voxels y=1, p=0.75: -log 0.75 = log(4/3)
    bce = (math.log(2) + math.log(4 / 3)) / 2
    assert float(BinaryCrossEntropyLoss()(logits, label)) == approx(bce)
    assert float(BCETotalVariationLoss(tv_weight=0.0)(logits, label)) == approx(bce)
    assert float(BCETotalVariationLoss(tv_weight=0.1)(logits, label)) == approx(bce + 0.1 / 12)
    assert float(BCETotalVariationLoss()(logits, label)) == approx(bce + 0.1 / 12)  # default tv_weight 0.1


def test_bce_tv_in_3d():
    logits = torch.zeros(1, 1, 2, 2, 2)
    logits[0, 0, 0, 0, 0] = math.log(3)  # p = 0.75 in one corner, 0.5 elsewhere
    label = torch.zeros(1, 1, 2, 2, 2)
    label[0, 0, 0, 0, 0] = 1
    # per axis: 4 pairs, one touches the corner (0.25) -> 1/16; three axes -> 3/16
    assert float(total_variation(torch.sigmoid(logits))) == approx(3 / 16)
    # BCE: corner -log 0.75, the 7 others log 2
    bce = (math.log(4 / 3) + 7 * math.log(2)) / 8
    loss = BCETotalVariationLoss(tv_weight=0.5)(logits, label)
    assert float(loss) == approx(bce + 0.5 * 3 / 16)
    logits.requires_grad_(True)
    BCETotalVariationLoss()(logits, label).backward()
    assert torch.isfinite(logits.grad).all()


def test_bce_tv_on_an_all_background_label():
    # step edge, label all 0: 4 voxels -log(1 - 0.5) = log 2, 4 voxels -log(1 - 0.75) = log 4; TV 1/12 as above
    expected = (math.log(2) + math.log(4)) / 2 + 0.1 / 12
    loss = BCETotalVariationLoss(0.1)(step_edge_2d(), torch.zeros(1, 1, 2, 4))
    assert math.isfinite(float(loss)) and float(loss) == approx(expected)


def test_bce_tv_refuses_a_negative_weight():
    with pytest.raises(ValueError, match="tv_weight"):
        BCETotalVariationLoss(-1.0)


# ---------------------------------------------------------------------------------------------------------------------
# The configs


BINARY = ["data.in_channels=1", "data.num_classes=2"]


@pytest.mark.parametrize("name, cls", [
    ("tversky", TverskyLoss),
    ("generalized_dice", GeneralizedDiceLoss),
    ("ce_weighted", WeightedCrossEntropyLoss),
    ("bce", BinaryCrossEntropyLoss),
    ("bce_tv", BCETotalVariationLoss),
])
def test_loss_configs_compose_and_score_a_perfect_prediction_below_a_wrong_one(name, cls, tmp_path):
    cfg = compose_config("train", [f"loss={name}", *BINARY], tmp_path)
    sigmoid = name.startswith("bce")
    assert cfg.get("activation", "softmax") == ("sigmoid" if sigmoid else "softmax")
    if name == "ce_weighted":
        assert cfg.loss.weight == "inverse_frequency"
        with pytest.raises(Exception, match="placeholder"):
            instantiate(cfg.loss)
        cfg.loss.weight = inverse_frequency_weights([0.9, 0.1])  # what training puts there
    loss_fn = instantiate(cfg.loss)
    assert type(loss_fn) is cls
    if name == "tversky":
        assert (loss_fn.alpha, loss_fn.beta) == (0.3, 0.7)
    if name == "ce_weighted":
        assert loss_fn.weight.tolist() == [approx(1 / 1.8), approx(5.0)]
    if sigmoid:
        assert cfg.loss._target_ == f"pipeline.training.losses.{cls.__name__}"
    if name == "bce_tv":
        assert loss_fn.tv_weight == 0.1
    # the check of tests/test_config.py, with one output channel (the foreground logit) for the sigmoid losses
    label = torch.zeros(1, 1, 8, 8, 8)
    label[..., 2:6, 2:6, 2:6] = 1
    right = torch.cat([1 - label, label], 1) * 20 - 10
    if sigmoid:
        right = right[:, 1:]
    assert loss_fn(right, label) < loss_fn(-right, label)
