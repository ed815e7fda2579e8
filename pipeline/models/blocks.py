"""Our own small 3D encoder-decoder, built from one reusable block.

MONAI's UNet wires its own residual units; this network exists to show (and test) a custom block in the same
pipeline: Conv3d -> norm -> activation, twice, with an optional residual connection.
"""

import torch
from torch import nn

NORMS = {"instance": lambda c: nn.InstanceNorm3d(c, affine=True), "batch": nn.BatchNorm3d}


class ConvBlock3D(nn.Module):
    """(Conv3d 3x3x3 -> norm -> LeakyReLU) x 2, plus a 1x1x1-projected skip when `residual`."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "instance", residual: bool = True):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            NORMS[norm](out_channels),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            NORMS[norm](out_channels),
        )
        self.skip = None
        if residual:
            self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1, bias=False)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.act(y + self.skip(x) if self.skip is not None else y)


class Conv3DNet(nn.Module):
    """U-shaped network of ConvBlock3D: strided-conv downsampling, transposed-conv upsampling, skip concatenation.

    Spatial sizes must be divisible by 2 ** (len(channels) - 1); the patch size and sliding-window roi see to that.
    """

    def __init__(self, in_channels: int, out_channels: int, channels=(16, 32, 64, 128), norm: str = "instance", residual: bool = True):
        super().__init__()
        channels = list(channels)
        self.stem = ConvBlock3D(in_channels, channels[0], norm, residual)
        self.down = nn.ModuleList(nn.Conv3d(c, c, 2, stride=2) for c in channels[:-1])
        self.encoders = nn.ModuleList(ConvBlock3D(a, b, norm, residual) for a, b in zip(channels[:-1], channels[1:]))
        self.up = nn.ModuleList(nn.ConvTranspose3d(b, a, 2, stride=2) for a, b in zip(channels[:-1], channels[1:]))
        self.decoders = nn.ModuleList(ConvBlock3D(2 * a, a, norm, residual) for a in channels[:-1])
        self.head = nn.Conv3d(channels[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down, enc in zip(self.down, self.encoders):
            skips.append(enc(down(skips[-1])))
        x = skips.pop()
        for up, dec in zip(reversed(self.up), reversed(self.decoders)):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)
