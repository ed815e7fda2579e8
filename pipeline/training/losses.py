"""The losses MONAI lacks: class-weighted cross-entropy, binary cross-entropy and BCE with total variation.

Each is called as `loss_fn(logits, label)`: logits (B, C, *spatial) float, label (B, 1, *spatial) integer class indices
(float or integer tensor), as MONAI's losses are. The configs in conf/loss/ use MONAI's own losses where it has them.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _indices(label: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B, 1, *spatial) class indices -> (B, *spatial) long, as torch's cross-entropy wants them."""
    return (label[:, 0] if label.dim() == logits.dim() else label).long()


def inverse_frequency_weights(frequencies: Sequence[float]) -> list[float]:
    """Class weights w_k = 1 / (K * f_k) over the K classes with f_k > 0, so that sum_k f_k * w_k = 1 (for frequencies
    summing to 1: the expected weight of a voxel is 1, the loss keeps the scale of plain cross-entropy)."""
    f = [float(x) for x in frequencies]
    if any(not math.isfinite(x) or x < 0 for x in f):
        raise ValueError(f"class frequencies must be finite and non-negative, got {f}")
    present = [x for x in f if x > 0]
    if not present:
        raise ValueError(f"class frequencies are all 0 ({f}): no labelled voxel to weight the classes by")
    # A class with no voxel in the training data gets weight 0: 1/0 is undefined, and a class weight only acts on the
    # voxels of that class, of which the training data has none.
    return [1.0 / (len(present) * x) if x > 0 else 0.0 for x in f]


class WeightedCrossEntropyLoss(torch.nn.Module):
    """Softmax cross-entropy with per-class weights: sum_i w_{y_i} * -log p_{y_i}(i) / sum_i w_{y_i} (torch's
    weighted mean: divided by the summed weights of the targets, not by the number of voxels)."""

    # Ours: MONAI has cross-entropy only inside DiceCELoss; torch's CrossEntropyLoss wants (B, *spatial) long labels.

    def __init__(self, weight: Sequence[float] | None = None):
        super().__init__()
        if isinstance(weight, str):
            raise ValueError(
                f"loss.weight={weight!r} is a placeholder: replace it by a list of per-class weights, e.g. "
                "pipeline.training.losses.inverse_frequency_weights(fingerprint['class_frequency']), before "
                "instantiating"
            )
        # a buffer, so that it follows the module to the GPU; list() also takes Hydra's ListConfig
        self.register_buffer("weight", None if weight is None else torch.tensor([float(w) for w in weight]))

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight is not None:
            if weight.numel() != logits.shape[1]:
                raise ValueError(f"{weight.numel()} class weights for {logits.shape[1]} output channels")
            weight = weight.to(logits.dtype)
        return F.cross_entropy(logits, _indices(label, logits), weight=weight)


class BinaryCrossEntropyLoss(torch.nn.Module):
    """Binary cross-entropy on one sigmoid output channel: mean over voxels of -[y log p + (1 - y) log(1 - p)],
    p = sigmoid(logit), y the {0, 1} label."""

    # Ours: MONAI has no plain BCE loss; torch's BCEWithLogitsLoss needs a float target and fails unclearly on C=2.

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != 1:
            raise ValueError(f"{type(self).__name__} expects one output channel (binary), got {logits.shape[1]}")
        target = (label.unsqueeze(1) if label.dim() == logits.dim() - 1 else label).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target)


def total_variation(p: torch.Tensor) -> torch.Tensor:
    """Anisotropic L1 total variation of (B, C, *spatial): sum over spatial axes d of mean |p[i + e_d] - p[i]|."""
    # An axis of length 1 (a 2D slice stored as 3D) has no neighbours and adds nothing, rather than a NaN mean.
    return sum((torch.diff(p, dim=d).abs().mean() for d in range(2, p.dim()) if p.shape[d] > 1), p.new_zeros(()))


class BCETotalVariationLoss(BinaryCrossEntropyLoss):
    """BCE + tv_weight * TV(p), p = sigmoid(logits) of shape (B, 1, *spatial) for 2D or 3D, with
    TV(p) = sum_{d in spatial axes} mean_{B, C, i} |p[i + e_d] - p[i]| (anisotropic L1 TV; each mean over N_d - 1
    neighbour pairs along d): penalises ragged boundaries and scattered voxels."""

    # Ours: MONAI has no total-variation loss for segmentation.

    def __init__(self, tv_weight: float = 0.1):
        super().__init__()
        if tv_weight < 0:
            raise ValueError(f"tv_weight must be >= 0, got {tv_weight}")
        self.tv_weight = float(tv_weight)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        bce = super().forward(logits, label)
        return bce + self.tv_weight * total_variation(torch.sigmoid(logits))
