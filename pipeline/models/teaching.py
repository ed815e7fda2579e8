"""The classic networks of U-Net course material that MONAI lacks, small and readable, built from our ConvBlock.

Every network takes spatial_dims (2 or 3), in_channels, out_channels (1: one sigmoid logit; K: softmax logits),
channels (features per level, or per layer for DilatedNet), dropout (spatial, in the blocks) and norm
("instance" | "batch"; "none" as well, for the normalization-free 2015 original).

EncoderDecoder, StridedUNet and DilatedNet return an output the size of their input. ValidUNet (unpadded
convolutions) returns a smaller one: it is an adapters.ValidNetwork, whose output training scores against the centre
of the label and inference runs as adapters.MirrorPadded(net).
"""

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.models.adapters import centre_crop
from pipeline.models.blocks import CONV, CONV_TRANSPOSE, DROPOUT, MAX_POOL, ConvBlock, conv_norm_act, layer


def _levels(channels: Sequence[int]) -> list[int]:
    channels = [int(c) for c in channels]
    if len(channels) < 2:
        raise ValueError(f"channels={channels}: need at least two levels (one down- and one upsampling)")
    return channels


def _head(spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    # 1x1(x1) conv to class logits; no norm or activation after it: the loss applies softmax / sigmoid itself.
    return layer(CONV, spatial_dims)(in_channels, out_channels, 1)


class EncoderDecoder(nn.Module):
    """Conv blocks with 2x max-pool down and transposed-conv 2x up, and NO skip connections: the decoder sees only
    the bottleneck. Sizes must be divisible by 2 ** (len(channels) - 1)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = (16, 32, 64, 128), dropout: float = 0.0, norm: str = "instance"):
        super().__init__()
        channels = _levels(channels)
        pool, up = layer(MAX_POOL, spatial_dims), layer(CONV_TRANSPOSE, spatial_dims)
        self.stem = ConvBlock(spatial_dims, in_channels, channels[0], norm, dropout)
        self.encoders = nn.ModuleList(
            nn.Sequential(pool(2), ConvBlock(spatial_dims, a, b, norm, dropout))
            for a, b in zip(channels[:-1], channels[1:])
        )
        # Mirror of the encoder; without skips the decoder must rebuild all detail from the bottleneck alone
        # (the point of this network in a course: compare its blurry boundaries with a U-Net's).
        self.decoders = nn.ModuleList(
            nn.Sequential(up(b, a, 2, stride=2), ConvBlock(spatial_dims, a, a, norm, dropout))
            for a, b in reversed(list(zip(channels[:-1], channels[1:])))
        )
        self.head = _head(spatial_dims, channels[0], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for encoder in self.encoders:
            x = encoder(x)
        for decoder in self.decoders:
            x = decoder(x)
        return self.head(x)


class StridedUNet(nn.Module):
    """U-Net that downsamples by stride-2 convolutions (no pooling) and upsamples by stride-2 transposed convolutions,
    with skip concatenation and padded convs. Sizes must be divisible by 2 ** (len(channels) - 1)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = (16, 32, 64, 128), dropout: float = 0.0, norm: str = "instance"):
        super().__init__()
        channels = _levels(channels)
        up = layer(CONV_TRANSPOSE, spatial_dims)
        self.stem = ConvBlock(spatial_dims, in_channels, channels[0], norm, dropout)
        # The first conv of each encoder block has stride 2: a learned downsampling instead of a fixed max-pool.
        self.encoders = nn.ModuleList(
            ConvBlock(spatial_dims, a, b, norm, dropout, stride=2) for a, b in zip(channels[:-1], channels[1:])
        )
        self.ups = nn.ModuleList(up(b, a, 2, stride=2) for a, b in zip(channels[:-1], channels[1:]))
        # 2a inputs: the upsampled features and the encoder's skip, concatenated.
        self.decoders = nn.ModuleList(ConvBlock(spatial_dims, 2 * a, a, norm, dropout) for a in channels[:-1])
        self.head = _head(spatial_dims, channels[0], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for encoder in self.encoders:
            skips.append(encoder(skips[-1]))
        x = skips.pop()  # the bottleneck
        for up, decoder in zip(reversed(self.ups), reversed(self.decoders)):
            x = decoder(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


class DilatedNet(nn.Module):
    """No down- or upsampling: 3x3(x3) convs with growing dilations (1, 2, 4, ...; padding = dilation keeps the size),
    each conv -> norm -> ReLU, then a 1x1 head. Receptive field 1 + 2 * sum(dilations) voxels per axis."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: int | Sequence[int] = 32,
                 dilations: Sequence[int] = (1, 2, 4, 8), dropout: float = 0.0, norm: str = "instance"):
        super().__init__()
        dilations = [int(d) for d in dilations]
        # One width for every layer, or one per layer (then as many as dilations).
        channels = [int(channels)] * len(dilations) if isinstance(channels, int) else [int(c) for c in channels]
        if len(channels) != len(dilations) or not dilations:
            raise ValueError(f"DilatedNet: channels {channels} and dilations {dilations} must have one entry per layer")
        layers = []
        for a, b, d in zip([in_channels, *channels[:-1]], channels, dilations):
            layers += conv_norm_act(spatial_dims, a, b, norm, padding=d, dilation=d)
            if dropout > 0:
                layers.append(layer(DROPOUT, spatial_dims)(dropout))
        self.body = nn.Sequential(*layers)
        self.head = _head(spatial_dims, channels[-1], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ValidUNet(nn.Module):
    """The 2015 U-Net (Ronneberger et al.): unpadded 3x3 convs, 2x2 max-pool, 2x2 up-convs, centre-cropped skips.

    Its output is smaller than its input: `output_size(n)` gives the size per axis, `valid_input_size(n)` the inputs
    it accepts: an adapters.ValidNetwork."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = (64, 128, 256, 512, 1024), dropout: float = 0.0, norm: str = "instance"):
        super().__init__()
        channels = _levels(channels)
        self.depth = len(channels) - 1  # number of poolings
        up = layer(CONV_TRANSPOSE, spatial_dims)
        block = lambda a, b: ConvBlock(spatial_dims, a, b, norm, dropout, padding=0)  # noqa: E731 (valid convs)
        self.encoders = nn.ModuleList(block(a, b) for a, b in zip([in_channels, *channels[:-1]], channels))
        self.pool = layer(MAX_POOL, spatial_dims)(2)
        # The paper's up-convolution halves the channels (1024 -> 512): here channels[k] -> channels[k - 1].
        self.ups = nn.ModuleList(up(b, a, 2, stride=2) for a, b in zip(channels[:-1], channels[1:]))
        self.decoders = nn.ModuleList(block(2 * a, a) for a in channels[:-1])
        self.head = _head(spatial_dims, channels[0], out_channels)

    def _output_size(self, n: int) -> int:
        size = n
        for level in range(1, self.depth + 1):  # contracting path: two convs (-2 each), then a 2x2 pool
            size -= 4
            if size < 2:
                raise ValueError(f"ValidUNet: input size {n} is too small: {size} voxels left before max-pool {level}")
            if size % 2:
                raise ValueError(f"ValidUNet: input size {n} gives an odd feature map ({size}) before max-pool {level}")
            size //= 2
        size -= 4  # the bottom level's two convs
        for _ in range(self.depth):  # expanding path: up-conv x2, then two convs
            if size < 1:
                break
            size = 2 * size - 4
        if size < 1:
            raise ValueError(f"ValidUNet: input size {n} is too small: the feature maps vanish ({size} voxels)")
        return size

    def output_size(self, n: int) -> int:
        """Output size along one axis for input size n (2015 arithmetic: 572 -> 388 with 4 poolings); ValueError
        when a pooling is not exact or the maps vanish."""
        try:
            return self._output_size(int(n))
        except ValueError as error:
            raise ValueError(f"{error}; the smallest valid input size >= {n} is {self.valid_input_size(n)}") from None

    def valid_input_size(self, n: int) -> int:
        """The smallest input size >= n for which every pooling is exact (and the output is not empty)."""
        m = max(int(n), 1)
        while True:  # valid sizes recur every 2 ** depth voxels, so this ends within a few steps past the minimum
            try:
                self._output_size(m)
                return m
            except ValueError:
                m += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for n in x.shape[2:]:  # a clear error here rather than a shape mismatch deep inside
            self.output_size(n)
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(self.pool(x) if level else x)
            skips.append(x)
        x = skips.pop()  # the bottom level
        for up, decoder in zip(reversed(self.ups), reversed(self.decoders)):
            x = up(x)
            # The skip is larger (its convs trimmed less): take its centre, the part the upsampled map covers.
            x = decoder(torch.cat([centre_crop(skips.pop(), x.shape[2:]), x], dim=1))
        return self.head(x)
