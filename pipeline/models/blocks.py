"""Our own convolution blocks and the small 3D encoder-decoder built from them.

MONAI's UNet wires its own residual units; these blocks exist to show (and test) custom blocks in the same pipeline.
One family: conv_norm_act (conv -> norm -> activation, 2D or 3D from the tables below) builds ConvBlock (the teaching
networks) and the residual ConvBlock3D of Conv3DNet. Conv3DNet is StridedUNet's shape with residual blocks, a separate
2x2x2 downsampling conv and LeakyReLU; it keeps its own class so that its checkpoints keep their keys.
"""

import torch
from torch import nn

# One layer class per spatial_dims: the same network code builds 2D (N C H W) and 3D (N C H W D) networks.
CONV = {2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
DROPOUT = {2: nn.Dropout2d, 3: nn.Dropout3d}  # spatial dropout: zeroes whole feature maps, not single voxels
NORM = {"instance": {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}, "batch": {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}}


def layer(table: dict, spatial_dims: int) -> type[nn.Module]:
    """The class for `spatial_dims` from one of the tables above, with a clear error for anything but 2 or 3."""
    if spatial_dims not in table:
        raise ValueError(f"spatial_dims={spatial_dims}: must be 2 or 3")
    return table[spatial_dims]


def norm_layer(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """Instance norm (with learned scale and shift, as nnU-Net) or batch norm over `channels` feature maps."""
    if norm not in NORM:
        raise ValueError(f"norm={norm!r}: must be 'instance' or 'batch' (the teaching networks also take 'none')")
    if norm == "instance":
        return layer(NORM[norm], spatial_dims)(channels, affine=True)
    return layer(NORM[norm], spatial_dims)(channels)


# The nonlinearity after a conv and its norm: ReLU in the course networks, LeakyReLU(0.01) as nnU-Net in Conv3DNet.
ACTIVATION = {"relu": lambda: nn.ReLU(inplace=True), "leaky": lambda: nn.LeakyReLU(0.01, inplace=True), None: None}


def conv_norm_act(spatial_dims: int, in_channels: int, out_channels: int, norm: str | None = "instance", *,
                  stride: int = 1, padding: int = 1, dilation: int = 1, act: str | None = "relu") -> list[nn.Module]:
    """3x3(x3) conv -> norm -> activation (`act` None: none, for a residual sum before it); norm None or "none"
    drops the norm (the 2015 U-Net had none) and gives the conv a bias. Every block of our networks is made of these."""
    use_norm = norm not in (None, "none")
    # A bias right before a norm is wasted: the norm subtracts the mean anyway.
    conv = layer(CONV, spatial_dims)(in_channels, out_channels, 3, stride=stride, padding=padding, dilation=dilation,
                                     bias=not use_norm)
    return [conv, *([norm_layer(norm, spatial_dims, out_channels)] if use_norm else []),
            *([ACTIVATION[act]()] if act else [])]


class ConvBlock(nn.Sequential):
    """(3x3(x3) conv -> norm -> ReLU) x 2, then spatial dropout when `dropout` > 0.

    `padding=1` keeps the size; `padding=0` is the 2015 valid conv (each trims one voxel per side); `stride=2` on the
    first conv halves the size (downsampling by convolution instead of pooling)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str | None = "instance",
                 dropout: float = 0.0, padding: int = 1, stride: int = 1):
        layers = [
            *conv_norm_act(spatial_dims, in_channels, out_channels, norm, stride=stride, padding=padding),
            *conv_norm_act(spatial_dims, out_channels, out_channels, norm, padding=padding),
        ]
        if dropout > 0:  # no module at all otherwise: the printed network shows only what acts
            layers.append(layer(DROPOUT, spatial_dims)(dropout))
        super().__init__(*layers)


class ConvBlock3D(nn.Module):
    """(Conv3d 3x3x3 -> norm -> LeakyReLU) x 2, plus a 1x1x1-projected skip when `residual`; spatial dropout after.
    ConvBlock's layers with the second activation after the residual sum (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "instance", residual: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        # body.0 conv, .1 norm, .2 act, .3 conv, .4 norm: the state_dict keys of every Conv3DNet checkpoint
        self.body = nn.Sequential(*conv_norm_act(3, in_channels, out_channels, norm, act="leaky"),
                                  *conv_norm_act(3, out_channels, out_channels, norm, act=None))
        self.skip = None
        if residual:
            self.skip = (nn.Identity() if in_channels == out_channels
                         else nn.Conv3d(in_channels, out_channels, 1, bias=False))
        self.act = ACTIVATION["leaky"]()
        self.drop = nn.Dropout3d(dropout) if dropout else nn.Identity()  # no parameters: checkpoints keep their keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.drop(self.act(y + self.skip(x) if self.skip is not None else y))


class Conv3DNet(nn.Module):
    """U-shaped network of ConvBlock3D: strided-conv downsampling, transposed-conv upsampling, skip concatenation.

    Spatial sizes must be divisible by 2 ** (len(channels) - 1); the patch size and sliding-window roi see to that.
    """

    def __init__(self, in_channels: int, out_channels: int, channels=(16, 32, 64, 128), norm: str = "instance",
                 residual: bool = True, dropout: float = 0.0):
        super().__init__()
        channels = list(channels)
        self.stem = ConvBlock3D(in_channels, channels[0], norm, residual, dropout)
        self.down = nn.ModuleList(nn.Conv3d(c, c, 2, stride=2) for c in channels[:-1])
        self.encoders = nn.ModuleList(ConvBlock3D(a, b, norm, residual, dropout)
                                      for a, b in zip(channels[:-1], channels[1:]))
        self.up = nn.ModuleList(nn.ConvTranspose3d(b, a, 2, stride=2) for a, b in zip(channels[:-1], channels[1:]))
        self.decoders = nn.ModuleList(ConvBlock3D(2 * a, a, norm, residual, dropout) for a in channels[:-1])
        self.head = nn.Conv3d(channels[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down, enc in zip(self.down, self.encoders):
            skips.append(enc(down(skips[-1])))
        x = skips.pop()
        for up, dec in zip(reversed(self.up), reversed(self.decoders)):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)
