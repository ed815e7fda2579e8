"""The teaching networks (pipeline/models/teaching.py): shapes, gradients, the 2015 size arithmetic, mirror padding,
no-skip wiring, options, and their configs."""

import pytest
import torch
from hydra.utils import instantiate
from torch import fx, nn

from pipeline.models.adapters import MirrorPadded
from pipeline.models.blocks import Conv3DNet
from pipeline.models.teaching import DilatedNet, EncoderDecoder, StridedUNet, ValidUNet
from tests.conftest import compose_config

NETS = ["encdec", "unet_strided", "dilatednet", "unet_valid"]
# Tiny sizes per network and spatial_dims: divisible by 4 for the two-pooling nets; valid (and small) for ValidUNet.
SIZES = {
    "encdec": {2: (16, 24), 3: (16, 12, 8)},
    "unet_strided": {2: (16, 24), 3: (16, 12, 8)},
    "dilatednet": {2: (15, 22), 3: (13, 10, 7)},  # no pooling: any size
    "unet_valid": {2: (44, 52), 3: (18, 20, 24)},  # two poolings in 2D (min 44), one in 3D (min 18)
}


def build(name: str, spatial_dims: int, in_channels: int = 1, out_channels: int = 3, **options) -> nn.Module:
    """A tiny network of each kind."""
    if name == "encdec":
        return EncoderDecoder(spatial_dims, in_channels, out_channels, [4, 8, 16], **options)
    if name == "unet_strided":
        return StridedUNet(spatial_dims, in_channels, out_channels, [4, 8, 16], **options)
    if name == "dilatednet":
        return DilatedNet(spatial_dims, in_channels, out_channels, [4, 8, 16], dilations=[1, 2, 4], **options)
    channels = [4, 8, 16] if spatial_dims == 2 else [4, 8]  # 3D: one pooling keeps the valid volume small
    return ValidUNet(spatial_dims, in_channels, out_channels, channels, **options)


def expected_size(net: nn.Module, size: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(net.output_size(n) for n in size) if isinstance(net, ValidUNet) else size


@pytest.mark.parametrize("out_channels", [1, 3])
@pytest.mark.parametrize("in_channels", [1, 2])
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", NETS)
def test_forward_shape_and_a_finite_gradient_on_every_parameter(name, spatial_dims, in_channels, out_channels):
    torch.manual_seed(0)
    net = build(name, spatial_dims, in_channels, out_channels)
    size = SIZES[name][spatial_dims]
    out = net(torch.randn(2, in_channels, *size))
    assert out.shape == (2, out_channels, *expected_size(net, size))
    assert out.shape[2:] == size or name == "unet_valid"
    (out * torch.randn_like(out)).sum().backward()
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert params
    for n, p in params:
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
    assert any(p.grad.abs().sum() > 0 for _, p in params)


# --- ValidUNet: the 2015 arithmetic ---------------------------------------------------------------------------------


def test_output_size_follows_the_2015_paper():
    net = ValidUNet(2, 1, 2, [2, 2, 2, 2, 2])  # the paper's depth (four poolings); the arithmetic ignores channels
    assert net.output_size(572) == 388
    assert net.valid_input_size(570) == 572 and net.valid_input_size(572) == 572
    # The paper's 572 x 572 tile really gives a 388 x 388 map.
    with torch.no_grad():
        assert net(torch.randn(1, 1, 572, 572)).shape == (1, 2, 388, 388)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_valid_sizes_lose_a_fixed_margin_and_valid_input_size_is_the_smallest(depth):
    net = ValidUNet(2, 1, 2, [2] * (depth + 1))
    margin = 12 * 2**depth - 8  # each level trims 4 before the pool and 4 after the up-conv, scaled by its pooling
    valid = []
    for n in range(1, 260):
        try:
            out = net.output_size(n)
        except ValueError:
            continue
        assert out == n - margin
        valid.append(n)
    assert valid and all(b - a == 2**depth for a, b in zip(valid, valid[1:]))  # every 2 ** depth voxels
    for n in range(1, 200):
        assert net.valid_input_size(n) == min(v for v in valid if v >= n)


@pytest.mark.parametrize("channels,size", [([2, 4], (18, 20, 30)), ([2, 4], (26, 32, 22)), ([2, 2, 4], (44, 48, 52))])
def test_output_size_matches_a_3d_forward_pass(channels, size):
    net = ValidUNet(3, 1, 2, channels)
    with torch.no_grad():
        out = net(torch.randn(1, 1, *size))
    assert out.shape[2:] == tuple(net.output_size(n) for n in size)


def test_an_odd_size_before_a_pool_or_a_vanishing_map_raises():
    net = ValidUNet(2, 1, 2, [2, 2, 2, 2, 2])
    with pytest.raises(ValueError, match="odd feature map .* before max-pool 1.* 572"):
        net.output_size(571)
    with pytest.raises(ValueError, match="odd"):
        net.output_size(574)  # 570 -> 285 -> 281: odd before the second pool
    with pytest.raises(ValueError, match="too small"):
        net.output_size(20)
    with pytest.raises(ValueError, match="odd"):
        ValidUNet(3, 1, 2, [2, 4])(torch.randn(1, 1, 18, 19, 18))  # forward says so too, before any conv runs


# --- MirrorPadded ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims,channels,size", [(2, [4, 8, 16], (30, 37)), (2, [4, 8, 16], (64, 41)),
                                                         (3, [4, 8], (20, 17, 13)), (3, [4, 8], (32, 32, 16))])
def test_mirror_padded_valid_unet_returns_the_input_size(spatial_dims, channels, size):
    net = MirrorPadded(ValidUNet(spatial_dims, 2, 3, channels))
    with torch.no_grad():
        assert net(torch.randn(2, 2, *size)).shape == (2, 3, *size)
    assert not hasattr(net, "output_size")  # the wrapped net is same-size: the pipeline must not wrap it again


class CentreOfValid(nn.Module):
    """A stand-in valid net: exact on multiples of 4 above 16, and its output is the input's centre (8 voxels trimmed
    per side): mirror padding then cropping must give back the input exactly."""

    def output_size(self, n):
        if n % 4 or n <= 16:
            raise ValueError(n)
        return n - 16

    def valid_input_size(self, n):
        return max(20, -(-n // 4) * 4)

    def forward(self, x):
        return x[..., 8:-8, 8:-8]


@pytest.mark.parametrize("size", [(20, 20), (21, 30), (17, 35)])
def test_mirror_padding_and_cropping_are_aligned(size):
    x = torch.randn(1, 2, *size)
    assert torch.equal(MirrorPadded(CentreOfValid())(x), x)


def test_mirror_padding_larger_than_the_input_raises():
    net = MirrorPadded(ValidUNet(3, 1, 2, [2, 4]))  # a 16-voxel margin: 9 voxels need 8 + 9 of padding
    with pytest.raises(ValueError, match="MirrorPadded: axis 2 of size 9 needs a mirror padding of 8\\+9"):
        net(torch.randn(1, 1, 32, 32, 9))


# --- wiring ---------------------------------------------------------------------------------------------------------


def concatenations(net: nn.Module) -> int:
    graph = fx.symbolic_trace(net).graph
    return sum(node.op == "call_function" and node.target is torch.cat for node in graph.nodes)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_encoder_decoder_has_no_skip_concatenation_and_strided_unet_has_one_per_level(spatial_dims):
    assert concatenations(EncoderDecoder(spatial_dims, 1, 2, [4, 8, 16])) == 0
    assert concatenations(StridedUNet(spatial_dims, 1, 2, [4, 8, 16])) == 2
    assert concatenations(DilatedNet(spatial_dims, 1, 2, 4, [1, 2])) == 0


@pytest.mark.parametrize("cls,only_bottleneck", [(EncoderDecoder, True), (StridedUNet, False)])
def test_only_the_bottleneck_reaches_the_encoder_decoders_output(cls, only_bottleneck):
    """Fix the bottleneck's output: the encoder-decoder's output no longer depends on the input; a U-Net's does."""
    torch.manual_seed(0)
    net = cls(3, 1, 2, [4, 8, 16]).eval()
    bottleneck = torch.randn(1, 16, 4, 4, 2)
    net.encoders[-1].register_forward_hook(lambda module, inputs, output: bottleneck)
    with torch.no_grad():
        a, b = net(torch.randn(1, 1, 16, 16, 8)), net(torch.randn(1, 1, 16, 16, 8))
    assert torch.equal(a, b) == only_bottleneck


def test_dilated_net_keeps_the_size_and_grows_its_receptive_field():
    torch.manual_seed(0)
    net = DilatedNet(2, 1, 1, 8, [1, 2, 4, 8], norm="none")  # no instance norm: it would couple every voxel
    x = torch.randn(1, 1, 41, 41, requires_grad=True)
    net(x)[0, 0, 20, 20].backward()
    reach = x.grad[0, 0].abs().sum(0).nonzero().flatten()  # columns that reach the centre output
    assert reach.min() == 20 - 15 and reach.max() == 20 + 15  # 1 + 2 * (1 + 2 + 4 + 8) = 31 voxels


def test_dilated_net_needs_one_width_per_dilation():
    with pytest.raises(ValueError, match="one entry per layer"):
        DilatedNet(3, 1, 2, [4, 8, 16], [1, 2, 4, 8])


# --- options --------------------------------------------------------------------------------------------------------


def kinds(net: nn.Module) -> set[type]:
    return {type(m) for m in net.modules()}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", NETS)
def test_norm_and_dropout_options_change_the_modules(name, spatial_dims):
    norms = {2: (nn.InstanceNorm2d, nn.BatchNorm2d), 3: (nn.InstanceNorm3d, nn.BatchNorm3d)}[spatial_dims]
    dropout = {2: nn.Dropout2d, 3: nn.Dropout3d}[spatial_dims]
    plain = kinds(build(name, spatial_dims))
    assert norms[0] in plain and norms[1] not in plain and dropout not in plain
    batch = kinds(build(name, spatial_dims, norm="batch"))
    assert norms[1] in batch and norms[0] not in batch
    assert dropout in kinds(build(name, spatial_dims, dropout=0.2))
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase)
                   for m in build(name, spatial_dims, norm="none").modules())


def test_the_2015_original_without_norm_has_conv_biases_and_relus():
    net = ValidUNet(2, 1, 2, [4, 8], norm="none")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs) and all(c.padding == (0, 0) for c in convs if c.kernel_size == (3, 3))
    assert nn.ReLU in kinds(net)


@pytest.mark.parametrize("name", NETS)
def test_bad_options_are_refused(name):
    with pytest.raises(ValueError, match="spatial_dims=1"):
        build(name, 1)
    with pytest.raises(ValueError, match="norm='group'"):
        build(name, 3, norm="group")


def test_conv3dnet_keeps_its_state_dict_keys():
    """Checkpoints of Conv3DNet from before the blocks went 2D/3D-generic still load."""
    keys = list(Conv3DNet(1, 2, channels=(4, 8)).state_dict())
    block = ["body.0.weight", "body.1.weight", "body.1.bias", "body.3.weight", "body.4.weight", "body.4.bias",
             "skip.weight"]
    assert keys == [
        *(f"stem.{k}" for k in block), "down.0.weight", "down.0.bias", *(f"encoders.0.{k}" for k in block),
        "up.0.weight", "up.0.bias", *(f"decoders.0.{k}" for k in block), "head.weight", "head.bias",
    ]
    assert isinstance(Conv3DNet(1, 2, norm="batch").stem.body[1], nn.BatchNorm3d)
    dropped = Conv3DNet(1, 2, channels=(4, 8), dropout=0.2)
    assert nn.Dropout3d in kinds(dropped) and nn.Dropout3d not in kinds(Conv3DNet(1, 2, channels=(4, 8)))
    assert list(dropped.state_dict()) == keys  # dropout has no parameters: the same checkpoint keys


# --- configs --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NETS)
def test_config_composes_instantiates_and_segments(name, tmp_path):
    cfg = compose_config("train", [f"model={name}", "data.in_channels=1", "data.num_classes=3"], tmp_path)
    assert cfg.model.spatial_dims == 3 and cfg.model.dropout == 0.0 and cfg.model.norm == "instance"
    net = instantiate(cfg.model)
    assert type(net).__name__ == cfg.model._target_.rsplit(".", 1)[1]
    size = (32, 32, 16) if name != "unet_valid" else (32, 32, 20)  # the valid net's z side: 16 would vanish
    with torch.no_grad():
        out = net(torch.randn(1, 1, *size))
    assert out.shape == (1, 3, *expected_size(net, size))
    if name == "unet_valid":  # the documented patch fits: 64 x 64 x 32 -> 48 x 48 x 16
        assert [net.output_size(n) for n in (64, 64, 32)] == [48, 48, 16]
        with torch.no_grad():
            assert MirrorPadded(net)(torch.randn(1, 1, *size)).shape == (1, 3, *size)
