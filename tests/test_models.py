"""Every network x loss trains a step in 2D and 3D; accumulation, early stopping, deep supervision and weight init."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from monai.losses import DeepSupervisionLoss

from pipeline.core.errors import InputError
from pipeline.inference.predictor import infer
from pipeline.models import checkpoint
from pipeline.models.adapters import for_inference
from pipeline.models.weights import initialise, kaiming_
from pipeline.training import engine
from pipeline.training.run import train
from tests.conftest import CONF, TINY_MODEL, compose_config, tiny_config

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
NOT_2D = {"conv3d", "unet2d"}  # conv3d is 3D by name; unet2d is already a 2D network run slice by slice
SIZE = {2: (32, 32), 3: (32, 32, 16)}
VALID_SIZE = {2: (44, 44), 3: (44, 44, 44)}  # unet_valid: every pooling exact, output still > 0


def build(model: str, loss: str, dims: int, tmp_path, classes: int = 3):
    overrides = [f"model={model}", f"loss={loss}", "data.in_channels=2", f"data.num_classes={classes}",
                 *TINY_MODEL[model]]
    if dims == 2:
        overrides.append("model.spatial_dims=2")
        if model == "unetr":
            overrides.append("model.img_size=[32,32]")
    if model == "unetpp":
        overrides.append("model.deep_supervision=true")  # the interesting case: four outputs trained at once
    if model == "unetr" and dims == 3:
        overrides.append("model.img_size=[32,32,16]")
    cfg = compose_config("train", overrides, tmp_path)
    return instantiate(cfg.model), instantiate(cfg.loss)


@pytest.mark.parametrize("loss", ["dice", "dicefocal"])
@pytest.mark.parametrize("dims", [3, 2])
@pytest.mark.parametrize("model", MODELS)
def test_every_network_trains_a_step_with_gradients_everywhere(model, dims, loss, tmp_path):
    if dims == 2 and model in NOT_2D:
        pytest.skip(f"{model} is not a {dims}D network")
    torch.manual_seed(0)
    net, loss_fn = build(model, loss, dims, tmp_path)
    size = VALID_SIZE[dims] if model == "unet_valid" else SIZE[dims]
    batch = {"image": torch.randn(2, 2, *size), "label": torch.randint(0, 3, (2, 1, *size)).float()}
    net.train()
    value = engine.batch_loss(net, batch, DeepSupervisionLoss(loss_fn, weight_mode="exp"), torch.device("cpu"), None)
    value.backward()
    assert math.isfinite(value.item())
    # MONAI's transformer blocks create cross-attention norms that only its cross-attention mode uses
    unused = "norm_cross_attn" if model == "unetr" else None
    missing = [n for n, p in net.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
               and not (unused and unused in n)]
    assert not missing, missing
    # inference: one full-size (B, classes, ...) logits tensor whatever the network returns in training
    with torch.no_grad():
        out = for_inference(net.eval())(batch["image"])
    assert out.shape == (2, 3, *size)


def test_a_binary_sigmoid_network_predicts_two_classes(tmp_path):
    cfg = compose_config("train", ["loss=bce", "data.in_channels=1", "data.num_classes=2", *TINY_MODEL["unet3d"]],
                         tmp_path)
    net, image = instantiate(cfg.model).eval(), torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        z, logits = net(image), for_inference(net)(image)
    assert cfg.out_channels == 1 and z.shape[1] == 1 and logits.shape[1] == 2
    torch.testing.assert_close(logits.softmax(1), torch.cat([1 - torch.sigmoid(z), torch.sigmoid(z)], 1))  # (0, z)
    with pytest.raises(Exception, match="binary data"):
        compose_config("train", ["loss=bce", "data.num_classes=3"], tmp_path).out_channels  # noqa: B018 (resolving it raises)


def test_accumulating_k_batches_equals_one_k_times_larger_batch(tiny_phantom, tmp_path):
    """2 training cases, one optimizer step: batch 1 with 2 accumulated against batch 2. With plain SGD at lr 1 the
    weights move by exactly the gradient, so equal weights after the step are equal gradients (fp32, no clipping)."""
    common = ["optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=false", "optimizer.weight_decay=0",
              "optimizer.lr=1.0", "trainer.amp=false", "trainer.grad_clip=null", "trainer.deterministic=true",
              "tracking=none", "trainer.val_every=99",
              "data.split.test=0.5", "data.split.val=0.25"]  # 8 phantom cases: 2 train, 2 val, 4 test
    states = []
    for name, extra in (("accumulated", ["data.batch_size=1", "trainer.accumulate=2"]),
                        ("large", ["data.batch_size=2"])):
        run = tmp_path / name
        train(tiny_config(tiny_phantom, run, overrides=[*common, *extra]))
        states.append(checkpoint.load(run / "checkpoints" / "last.pt")["state_dict"])
    initial = instantiate(tiny_config(tiny_phantom, tmp_path / "x",
                                      overrides=["data.num_classes=3", "data.in_channels=1"]).model)
    moved = [k for k, v in initial.state_dict().items()
             if v.is_floating_point() and not torch.allclose(v, states[0][k])]
    assert moved  # the steps changed the weights (so equality below is not trivial)
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], atol=1e-5, rtol=0)


def test_early_stopping_stops_after_patience_validations_without_gain(tiny_phantom, tmp_path):
    result = train(tiny_config(tiny_phantom, tmp_path, overrides=[
        "trainer.max_epochs=6", "trainer.val_every=1", "trainer.early_stopping.patience=2",
        "trainer.early_stopping.min_delta=1.0", "tracking=none"]))
    # epoch 1 sets the best; no later validation can beat it by 1.0: epochs 2 and 3 are the two stale ones
    assert result["epochs"] == 3 and len(result["history"]) == 3


def test_kaiming_init_and_encoder_weights_from_a_local_file(tmp_path):
    cfg = compose_config("train", ["data.in_channels=1", "data.num_classes=3", *TINY_MODEL["unet3d"]], tmp_path)
    torch.manual_seed(0)
    source = instantiate(cfg.model)
    torch.save(source.state_dict(), tmp_path / "encoder.pt")
    torch.manual_seed(1)
    target = kaiming_(instantiate(cfg.model))
    conv = target.model[0].conv.unit0.conv
    fan_out = conv.out_channels * math.prod(conv.kernel_size)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (1 + 0.01**2) / fan_out), rel=0.2)
    assert not conv.bias.any()

    initialise(target, {"weights": str(tmp_path / "encoder.pt"), "prefix": "model.0."})
    convs = [n for n in target.state_dict() if n.endswith("conv.weight")]
    assert any(n.startswith("model.0.") for n in convs) and not all(n.startswith("model.0.") for n in convs)
    for name in convs:  # the encoder's first level copied, every other convolution left as initialised
        assert torch.equal(target.state_dict()[name], source.state_dict()[name]) == name.startswith("model.0."), name


def binary_folders(phantom, root):
    """The phantom as plain folder pairs with one foreground class (organ and lesion merged)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for case in json.loads((phantom / "dataset.json").read_text())["training"]:
        name = case["image"].split("/")[-1]
        (root / "images" / name).symlink_to(phantom / case["image"])
        label = nib.load(phantom / case["label"])
        nib.save(nib.Nifti1Image((np.asarray(label.dataobj) > 0).astype(np.uint8), label.affine),
                 root / "labels" / name)
    return root


def test_binary_data_trains_with_one_sigmoid_channel_and_predicts_labels(tiny_phantom, tmp_path):
    root = binary_folders(tiny_phantom, tmp_path / "binary")
    cfg = tiny_config(tiny_phantom, tmp_path, overrides=["data=folders", f"data.root={root}",
                                                         "data.class_names=[background,organ]", "loss=bce_tv",
                                                         "optimizer.lr=0.01", "tracking=none"])
    result = train(cfg)
    bundle = checkpoint.load(tmp_path / "checkpoints" / "best.pt")
    assert bundle["config"]["model"]["out_channels"] == 1 and "val_dice_organ" in result["best"]
    assert math.isfinite(result["best"]["val_dice_organ"]) and result["run_name"] == "UNet_Adam_BCETotalVariationLoss"
    [out] = infer(tmp_path / "checkpoints" / "best.pt", root / "images" / "phantom_000.nii.gz",
                  tmp_path / "pred")["written"]
    assert set(map(int, nib.load(out).get_fdata().ravel())) <= {0, 1}
    with pytest.raises(InputError, match="needs binary labels; this dataset has 3 classes"):
        train(tiny_config(tiny_phantom, tmp_path / "three", overrides=["loss=bce", "tracking=none"]))


def test_a_valid_unet_refuses_a_patch_its_poolings_cannot_halve(tiny_phantom, tmp_path):
    # two poolings
    cfg = tiny_config(tiny_phantom, tmp_path, "unet_valid", ["model.channels=[4,8,16]", "tracking=none"])
    with pytest.raises(InputError,
                       match=r"data.patch_size=\[32, 32, 16\]: ValidUNet .* nearest valid patch is \[44, 44, 44\]"):
        train(cfg)
