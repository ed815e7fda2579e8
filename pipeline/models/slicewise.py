"""Apply a 2D network to a 3D volume slice by slice (MONAI has no such wrapper for training)."""

import torch
from torch import nn


class SliceWise(nn.Module):
    """Runs `net` (2D, N C H W) on every axial slice of N C H W D input and restacks the output along D; a stack of
    deep-supervision heads (N, 1 + n, C, H, W), as DynUNet trains, comes back as (N, 1 + n, C, H, W, D)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.run_name = f"{type(net).__name__}2D"  # the MLflow run name says it is the 2D variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w, d = x.shape
        y = self.net(x.permute(0, 4, 1, 2, 3).reshape(n * d, c, h, w))
        return y.reshape(n, d, *y.shape[1:]).movedim(1, -1)
