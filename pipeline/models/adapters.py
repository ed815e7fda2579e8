"""What the pipeline needs from any network, in one place: its training outputs as a list or a tensor, and one
(B, K, ...) logits tensor the size of the input for sliding-window inference and export.

Networks differ in three ways the engine must not know about: deep supervision (DynUNet stacks its heads in one
(B, 1 + n, C, ...) tensor; BasicUNetPlusPlus returns a list), one sigmoid channel instead of K softmax ones, and
unpadded (valid) convolutions, whose output is smaller than their input (ValidNetwork).
"""

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn


@runtime_checkable
class ValidNetwork(Protocol):
    """A network of unpadded convolutions (teaching.ValidUNet): its output is smaller than its input. Training scores
    the output against the label's centre; inference runs it as MirrorPadded(net)."""

    def output_size(self, n: int) -> int:
        """The output's size along an axis whose input has n voxels (ValueError when n is not a valid input)."""

    def valid_input_size(self, n: int) -> int:
        """The smallest valid input size >= n."""


def centre_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The centre of x (N C ...) at spatial `size`."""
    starts = [(n - s) // 2 for n, s in zip(x.shape[2:], size)]
    return x[(..., *(slice(a, a + s) for a, s in zip(starts, size)))]


def training_outputs(out, label: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    """A network's training output(s) in fp32, the full-resolution main output first when there are several."""
    if isinstance(out, (list, tuple)):  # BasicUNetPlusPlus: nested decoder outputs, the most refined last
        return [o.float() for o in reversed(out)] if len(out) > 1 else out[0].float()
    if out.dim() == label.dim() + 1:  # DynUNet with deep supervision: (B, 1 + n, C, ...), the main output first
        return [o.float() for o in out.unbind(1)]
    return out.float()


class MirrorPadded(nn.Module):
    """Runs a valid network on a mirror-padded input and centre-crops its output to the input's size (the 2015
    overlap-tile strategy)."""

    def __init__(self, net: ValidNetwork):
        super().__init__()
        self.net = net

    def padding(self, n: int) -> tuple[int, int]:
        """(before, after) padding of an axis of size n so the net's output covers all n voxels."""
        m = self.net.valid_input_size(n)
        while self.net.output_size(m) < n:
            m = self.net.valid_input_size(m + 1)
        # The net trims an even margin symmetrically, so its output's centre is the input's centre: crop at the centre.
        return (m - n) // 2, m - n - (m - n) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        pads = [self.padding(n) for n in size]
        for axis, (n, (before, after)) in enumerate(zip(size, pads)):
            if after >= n:  # torch's reflect padding mirrors inside the input, so it needs fewer voxels than the input
                raise ValueError(f"MirrorPadded: axis {axis} of size {n} needs a mirror padding "
                                 f"of {before}+{after} voxels, "
                                 f"and reflect padding must be smaller than the size: use a larger input (window)")
        # F.pad lists (before, after) from the last axis backwards.
        x = F.pad(x, [p for pair in reversed(pads) for p in pair], mode="reflect")
        return centre_crop(self.net(x), size)


class ForInference(nn.Module):
    """What sliding-window inference and export run: one (B, K, ...) logits tensor the size of the input, whatever
    the network returns (a list of deep-supervision outputs, one sigmoid channel, a smaller valid output)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = MirrorPadded(net) if isinstance(net, ValidNetwork) else net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, (list, tuple)):  # BasicUNetPlusPlus returns a list even in eval mode; the last is final
            out = out[-1]
        # One sigmoid logit z is the two-class softmax logits (0, z): softmax((0, z)) = (1 - sigmoid(z), sigmoid(z)),
        # so argmax, TTA averaging and probability maps work unchanged for binary networks.
        return torch.cat([torch.zeros_like(out), out], 1) if out.shape[1] == 1 else out


def for_inference(model: nn.Module) -> ForInference:
    """`model` wrapped for inference, in eval mode (a new wrapper would be in training mode, and so would its network
    after anything, e.g. torch.onnx.export, restores the wrapper's mode)."""
    return model if isinstance(model, ForInference) else ForInference(model).eval()
