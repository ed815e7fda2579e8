"""Every option of every config group composes and instantiates into a working component."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from monai.transforms import Compose
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from pipeline.data.transforms import preprocess, train_transforms
from pipeline.models.adapters import for_inference
from pipeline.training.completion import complete
from pipeline.training.losses import inverse_frequency_weights
from tests.conftest import CONF, compose_config, shared_dataset, tiny_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in ["data", "transforms", "transforms/normalize", "transforms/augment", "model", "loss", "optimizer",
                  "scheduler", "trainer", "tracking", "experiment", "hparams_search", "hydra/launcher"]:
        assert options(group), group


def test_defaults_compose_to_the_documented_choices(tmp_path):
    cfg = compose_config("train", run_dir=tmp_path)
    assert cfg.model._target_ == "monai.networks.nets.UNet" and cfg.model.spatial_dims == 3
    assert cfg.loss._target_ == "monai.losses.DiceLoss"
    assert cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.trainer.amp == "auto" and cfg.trainer.device == "auto"
    assert cfg.tracking.uri.startswith("sqlite:///")
    assert Path(cfg.paths.outputs).is_absolute()


def test_a_model_built_before_the_config_is_completed_fails_instead_of_guessing(tiny_phantom, tmp_path):
    cfg = tiny_config(tiny_phantom, tmp_path)
    with pytest.raises(MissingMandatoryValue, match="in_channels"):
        instantiate(cfg.model)
    complete(cfg)
    assert (cfg.data.in_channels, cfg.data.num_classes) == (1, 3)
    assert instantiate(cfg.model)(torch.randn(1, 1, 32, 32, 16)).shape == (1, 3, 32, 32, 16)


@pytest.mark.parametrize("model", options("model"))
def test_model_options_build_and_segment_a_volume(model, tiny_phantom, tmp_path):
    cfg = tiny_config(tiny_phantom, tmp_path, model)
    complete(cfg)
    net = instantiate(cfg.model)
    out = for_inference(net.eval())(torch.randn(2, 1, 32, 32, 16))  # what validation and inference run
    assert out.shape == (2, 3, 32, 32, 16)  # (training steps and gradients: tests/test_models.py)


@pytest.mark.parametrize("loss", options("loss"))
def test_loss_options_score_a_perfect_prediction_below_a_wrong_one(loss, tmp_path):
    cfg = compose_config("train", [f"loss={loss}", "data.num_classes=2"], tmp_path)
    if cfg.loss.get("weight") == "inverse_frequency":  # filled from the training data by pipeline.training.run.setup
        cfg.loss.weight = inverse_frequency_weights([0.9, 0.1])
    loss_fn = instantiate(cfg.loss)
    label = torch.zeros(1, 1, 8, 8, 8)
    label[..., 2:6, 2:6, 2:6] = 1
    right = torch.cat([1 - label, label], 1) * 20 - 10  # confident logits, correct class
    if cfg.activation == "sigmoid":  # one channel: the foreground logit
        right = right[:, 1:]
    wrong = -right
    assert loss_fn(right, label) < loss_fn(wrong, label)


@pytest.mark.parametrize("optimizer", options("optimizer"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_optimizer_and_scheduler_options_build(optimizer, scheduler, tmp_path):
    cfg = compose_config("train", [f"optimizer={optimizer}", f"scheduler={scheduler}"], tmp_path)
    opt = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.ones(3))])
    assert opt.param_groups[0]["lr"] == cfg.optimizer.lr
    if optimizer == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.99 and opt.param_groups[0]["nesterov"]
    sched = instantiate(cfg.scheduler)(opt) if cfg.scheduler else None
    assert (sched is None) == (scheduler == "none")


@pytest.mark.parametrize("normalize", options("transforms/normalize"))
def test_normalize_options_preprocess_a_case(normalize, tiny_phantom, tmp_path):
    planned = ["plan=auto", "data.patch_size=[32,32,16]", "data.batch_size=1"] if normalize == "auto" else []
    cfg = tiny_config(tiny_phantom, tmp_path, overrides=[f"transforms/normalize={normalize}", *planned])
    dataset = complete(cfg).dataset
    case = Compose(preprocess(cfg))(dataset.cases[0])
    image = case["image"]
    if normalize in ("zscore", "auto"):
        assert abs(float(image.mean())) < 1e-3 and abs(float(image.std()) - 1) < 1e-2
    elif normalize == "zscore_fg":
        fg = image[image != 0]
        assert abs(float(fg.mean())) < 1e-3
    else:
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


@pytest.mark.parametrize("augment", options("transforms/augment"))
def test_training_transforms_give_patches_of_the_configured_size(augment, tiny_phantom, tmp_path):
    cfg = tiny_config(tiny_phantom, tmp_path, overrides=[f"transforms/augment={augment}"])
    dataset = complete(cfg).dataset
    transform = train_transforms(cfg)
    transform.set_random_state(0)
    for _ in range(5):  # every random branch of the augmentations gets a chance to run
        patches = transform(dataset.cases[0])
        assert len(patches) == cfg.transforms.patch.num_samples
        for p in patches:
            assert p["image"].shape == p["label"].shape == (1, 32, 32, 16)
            assert set(p["label"].unique().tolist()) <= {0.0, 1.0, 2.0}
            assert torch.isfinite(p["image"]).all()


def test_augmentations_switch_off_one_by_one(tiny_phantom, tmp_path):
    cfg = tiny_config(tiny_phantom, tmp_path,
                      overrides=["transforms.augment.noise=null", "transforms.augment.affine=null"])
    complete(cfg)
    names = [type(t).__name__ for t in train_transforms(cfg).transforms]
    assert "RandGaussianNoised" not in names and "RandAffined" not in names and "RandFlipd" in names


@pytest.mark.parametrize("tracking", options("tracking"))
def test_tracking_options_build(tracking, tmp_path):
    cfg = compose_config("train", [f"tracking={tracking}"], tmp_path)
    tracker = instantiate(cfg.tracking)
    assert hasattr(tracker, "log_metrics") and hasattr(tracker, "finish")


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_options_compose_and_build(experiment, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}", f"data.root={shared_dataset('msd_hippocampus')}"],
                         tmp_path)
    complete(cfg)
    net = for_inference(instantiate(cfg.model))  # as validation and inference run it (deep supervision off)
    patch = list(cfg.data.patch_size)
    assert net(torch.randn(1, cfg.data.in_channels, *patch)).shape == (1, cfg.data.num_classes, *patch)


def test_the_quick_hippocampus_recipe_is_the_final_one_with_its_few_minute_overrides(tmp_path):
    root = f"data.root={shared_dataset('msd_hippocampus')}"
    quick = compose_config("train", ["experiment=hippocampus_quick", root], tmp_path)
    final = compose_config("train", ["experiment=hippocampus", root, "model=unet3d", "data.fold=null",
                                     "data.batch_size=2", "plan.base_filters=16", "optimizer.lr=0.004",
                                     *(f"transforms.augment.{t}=null" for t in ("rotate90", "affine", "noise",
                                                                                 "gamma")),
                                     "trainer.max_minutes=2", "trainer.val_every=10"], tmp_path)
    assert OmegaConf.to_container(quick) == OmegaConf.to_container(final)
    assert quick.model._target_ == "monai.networks.nets.UNet" and quick.transforms.augment.flip_x is not None


def test_infer_config_composes(tmp_path):
    cfg = compose_config("infer", ["ckpt=a.pt", "input=b.nii.gz"])
    assert cfg.amp == "auto" and Path(cfg.output).is_absolute()


def test_rotate90_is_skipped_on_a_non_square_patch(tiny_phantom, tmp_path):
    cfg = tiny_config(tiny_phantom, tmp_path, overrides=["data.patch_size=[32,48,16]"])
    dataset = complete(cfg).dataset
    transform = train_transforms(cfg)
    assert "RandRotate90d" not in [type(t).__name__ for t in transform.transforms]
    assert all(p["image"].shape == (1, 32, 48, 16) for p in transform(dataset.cases[0]))


def test_evaluate_config_composes_with_its_own_tracking_experiment(tmp_path):
    cfg = compose_config("evaluate", [], tmp_path)
    assert (cfg.ckpt, cfg.split, cfg.tracking.experiment, cfg.nsd_tolerance_mm) == (None, "test", "evaluation", 1.0)
