"""Shared fixtures: a tiny phantom set, a throwaway MLflow store, config composition, and the real shared data."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from bench.common import shared_data
from pipeline import project_root
from pipeline.core.config import compose
from pipeline.data.phantom import synthesize
from pipeline.models import checkpoint
from pipeline.training.completion import complete

CONF = project_root() / "conf"
# The one setting that locates the real datasets (README of ../shared/data); CI=true turns "missing" into a failure.
SHARED_DATA = shared_data()

# Small but real: two resolution levels, small patches, so a CPU epoch takes seconds.
TINY = [
    "data.patch_size=[32,32,16]",
    "data.batch_size=1",
    "transforms.patch.num_samples=2",  # two crops per case: a 1-case batch of one crop makes six steps too noisy
    "trainer.max_epochs=1",
    "trainer.val_every=1",
    "trainer.inferer.sw_batch_size=2",
]


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory) -> str:
    """Every test tracks into one throwaway sqlite store (created once: MLflow's schema migration is slow)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """Eight phantom cases in MSD layout (6 train / 1 val / 1 test)."""
    return synthesize(tmp_path_factory.mktemp("data") / "phantom", num_cases=8, seed=1)


def compose_config(name: str = "train", overrides: list[str] = (), run_dir: Path | None = None) -> DictConfig:
    """Compose a config as the entry point would, with this run's folder set (no Hydra runtime in tests)."""
    # outputs (fingerprints, caches) of a test stay in its own folder
    extra = [f"paths.run_dir={run_dir}", f"paths.outputs={run_dir}/outputs"] if run_dir else []
    return compose(name, [*overrides, *extra])


# Per model: a few levels of 4-32 channels, so every network trains a step in about a second on a CPU.
TINY_MODEL = {
    "unet3d": ["model.channels=[8,16,32]", "model.strides=[2,2]"],
    "unet2d": ["model.net.channels=[8,16,32]", "model.net.strides=[2,2]"],
    "conv3d": ["model.channels=[8,16,32]"],
    "basicunet": ["model.features=[4,4,8,8,16,4]"],
    "attention_unet": ["model.channels=[8,16,32]", "model.strides=[2,2]"],
    "unetpp": ["model.features=[4,4,8,8,16,4]"],
    "segresnet": ["model.init_filters=4"],
    "dynunet": ["model.filters=[4,8,16,32]", "model.kernel_size=[3,3,3,3]", "model.strides=[1,2,2,2]",
                "model.upsample_kernel_size=[2,2,2]"],
    "unetr": ["model.feature_size=4", "model.hidden_size=48", "model.mlp_dim=96", "model.num_heads=2"],
    "encdec": ["model.channels=[4,8,16]"],
    "unet_strided": ["model.channels=[4,8,16]"],
    "dilatednet": ["model.channels=4", "model.dilations=[1,2,4]"],
    "unet_valid": ["model.channels=[4,8]"],
}


def tiny_config(phantom: Path, run_dir: Path, model: str = "unet3d", overrides: list[str] = ()) -> DictConfig:
    # The run's MLflow model (about 2 s to write) only for the tests that register it or say so: the suite trains ~60
    # times, and tests/test_mlflow_models.py and test_tracking_server.py check the model itself.
    logged = any(o.startswith(("tracking.register=", "tracking.log_model=", "tracking=")) for o in overrides)
    return compose_config("train", [f"data.root={phantom}", f"model={model}", *TINY, *TINY_MODEL[model],
                                    *([] if logged else ["tracking.log_model=false"]), *overrides], run_dir)


def shared_dataset(name: str) -> Path:
    """A dataset from ../shared/data: skipped where absent, a failure under CI."""
    path = SHARED_DATA / name
    if not path.exists():
        message = f"{path} missing (set PIPELINE_SHARED_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def hippocampus_subset(folder: Path, n: int) -> Path:
    """The first n real MSD hippocampus cases, linked into a dataset of their own (fast tests)."""
    return shared_subset("msd_hippocampus", folder, n)


def shared_subset(name: str, folder: Path, n: int) -> Path:
    """The first n cases of a shared MSD-layout dataset, linked (not copied) into a dataset of their own."""
    root = shared_dataset(name)
    meta = json.loads((root / "dataset.json").read_text())
    cases = meta["training"][:n]
    for case in cases:
        for rel in case.values():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).symlink_to((root / rel).resolve())
    (folder / "dataset.json").write_text(json.dumps(meta | {"training": cases, "numTraining": n}))
    return folder


@pytest.fixture
def threshold_ckpt(tiny_phantom, tmp_path):
    """A checkpoint whose 'network' is a 1x1x1 conv with logits (-sum x, sum x) over the channels: it labels
    voxels where the z-scored channels sum above 0 (for one channel: above the volume mean)."""

    def make(overrides=(), channels: int = 1):
        cfg = tiny_config(tiny_phantom, tmp_path, overrides=list(overrides))
        complete(cfg)
        config = OmegaConf.to_container(cfg, resolve=True)
        config["model"] = {"_target_": "torch.nn.Conv3d", "in_channels": channels, "out_channels": 2, "kernel_size": 1}
        config["data"]["num_classes"], config["data"]["in_channels"] = 2, channels
        net = torch.nn.Conv3d(channels, 2, 1)
        with torch.no_grad():
            net.weight.copy_(torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1, 1).expand(2, channels, 1, 1, 1))
            net.bias.zero_()
        return checkpoint.save(tmp_path / "threshold.pt", net, config)

    return make


def wait_for_epoch(last: Path, epoch: int = 1, timeout: float = 300) -> None:
    """Until `last` (a running training's last.pt) holds `epoch` or a later one."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (last.exists() and checkpoint.load(last)["epoch"] >= epoch):
        time.sleep(0.05)


def training_process(phantom: Path, run_dir: Path, *overrides: str, outputs: Path | None = None,
                     epoch: int = 1) -> tuple[subprocess.Popen, Path]:
    """`python -m pipeline.train` of the tiny UNet on `phantom` in its own process (so real signals and faults can
    reach it), returned with its last.pt once that holds `epoch`."""
    args = [f"data.root={phantom}", *TINY, *TINY_MODEL["unet3d"], *overrides, f"hydra.run.dir={run_dir}",
            f"paths.outputs={outputs or run_dir / 'outputs'}"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=project_root(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = run_dir / "checkpoints" / "last.pt"
    wait_for_epoch(last, epoch)
    return proc, last


def split_parent(runs: list) -> tuple[list, list]:
    """A sweep's parent run (tagged sweep_parent) apart from its jobs' runs."""
    return [r for r in runs if "sweep_parent" in r.data.tags], [r for r in runs if "sweep_parent" not in r.data.tags]
