"""Crashes lose nothing: SIGKILL then resume equals an unbroken run; seeds reproduce; checkpoints cannot run code."""

import os
import pickle
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from omegaconf import OmegaConf

from pipeline import checkpoint, project_root
from pipeline.completion import complete
from pipeline.data.transforms import cache_mode
from pipeline.errors import InputError
from pipeline.training import train
from tests.conftest import TINY, TINY_MODEL, tiny_config

DETERMINISTIC = ["trainer.amp=false", "trainer.deterministic=true", "trainer.max_epochs=4", "trainer.val_every=1"]


def history(store: str, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(mlflow.MlflowClient(store).get_metric_history(run_id, key), key=lambda m: m.step)]


def test_two_runs_with_one_seed_are_identical(tiny_phantom, tmp_path, mlflow_store):
    runs = [train(tiny_config(tiny_phantom, tmp_path / name, overrides=DETERMINISTIC[:2] + ["trainer.max_epochs=2"]))
            for name in "ab"]
    assert runs[0]["step_losses"] == runs[1]["step_losses"]
    for key in ("train_loss", "val_dice_mean", "val_iou_lesion"):
        assert history(mlflow_store, runs[0]["run_id"], key) == history(mlflow_store, runs[1]["run_id"], key)
    tags = mlflow.MlflowClient(mlflow_store).get_run(runs[0]["run_id"]).data.tags
    assert {"git_commit", "git_dirty", "data_fingerprint", "torch", "monai", "python", "seed", "device",
            "amp"} <= tags.keys()
    assert tags["torch"] == torch.__version__


def test_resume_after_sigkill_matches_an_unbroken_run(tiny_phantom, tmp_path, mlflow_store):
    unbroken = train(tiny_config(tiny_phantom, tmp_path / "unbroken", overrides=DETERMINISTIC))

    run_dir = tmp_path / "killed"
    args = [f"data.root={tiny_phantom}", *TINY, *TINY_MODEL["unet3d"], *DETERMINISTIC, f"hydra.run.dir={run_dir}",
            f"paths.outputs={run_dir}/outputs"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=project_root(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not (last.exists() and checkpoint.load(last)["epoch"] >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-epoch 3: no chance to clean up
    proc.wait()
    killed_at = checkpoint.load(last)["epoch"]
    assert 2 <= killed_at < 4, "the run finished before it could be killed"

    # `make train resume=<last.pt>`, in this process: a start costs ~10 s
    train(OmegaConf.create({"resume": str(last)}))
    resumed = checkpoint.load(last)
    assert resumed["epoch"] == 4
    run_id = resumed["run_id"]
    assert mlflow.MlflowClient(mlflow_store).get_run(run_id).info.status == "FINISHED"
    for key in ("train_loss", "val_dice_mean", "lr"):
        assert (history(mlflow_store, run_id, key)[-1]
                == pytest.approx(history(mlflow_store, unbroken["run_id"], key)[-1], abs=1e-6)), key
    steps = [m.step for m in mlflow.MlflowClient(mlflow_store).get_metric_history(run_id, "train_loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4]  # one MLflow run, the epoch counter carried on


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = marker
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "config": Exploit()}, f)
    with pytest.raises(InputError, match="evil.pt: not a readable checkpoint"):
        checkpoint.load(path)
    assert not marker.exists()


def test_an_oversized_memory_cache_falls_back_to_disk(tiny_phantom, tmp_path):
    cfg = tiny_config(tiny_phantom, tmp_path, overrides=["data.cache=memory", "data.cache_ram_gb=0.001"])
    dataset = complete(cfg).dataset
    assert cache_mode(cfg, dataset.cases) == "disk"  # about 8 x 0.6 MB x 2 would not fit in 1 MB
    cfg = tiny_config(tiny_phantom, tmp_path, overrides=["data.cache=memory", "data.cache_ram_gb=1"])
    complete(cfg)
    assert cache_mode(cfg, dataset.cases) == "memory"
