"""One-epoch training runs on a tiny phantom set, checked through the checkpoint and the MLflow store."""

import json
import math

import mlflow
import pytest
import torch

from pipeline import checkpoint, hardware
from pipeline.train import train
from tests.conftest import tiny_config

RUN_NAMES = {
    ("unet3d", "dice"): "UNet_Adam_DiceLoss",
    ("unet3d", "dicefocal"): "UNet_Adam_DiceFocalLoss",
    ("conv3d", "dice"): "Conv3DNet_Adam_DiceLoss",
    ("conv3d", "dicefocal"): "Conv3DNet_Adam_DiceFocalLoss",
}


@pytest.mark.parametrize("model,loss", list(RUN_NAMES))
def test_one_epoch_trains_checkpoints_and_tracks(model, loss, tiny_phantom, tmp_path, mlflow_store, capsys):
    cfg = tiny_config(tiny_phantom, tmp_path, model, [f"loss={loss}", "optimizer.lr=0.01"])
    result = train(cfg)

    losses = result["step_losses"]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-2:]) < sum(losses[:2]), losses  # falling over six steps

    for name in ("best.pt", "last.pt"):
        bundle = checkpoint.load(tmp_path / "checkpoints" / name)
        assert bundle["config"]["model"]["_target_"] == cfg.model._target_
        assert all(isinstance(t, torch.Tensor) for t in bundle["state_dict"].values())
    assert "optimizer" in checkpoint.load(tmp_path / "checkpoints" / "last.pt")

    mlflow.set_tracking_uri(mlflow_store)
    run = mlflow.get_run(result["run_id"])
    assert run.info.run_name == result["run_name"] == RUN_NAMES[model, loss]
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "lr", "epoch_time", "val_dice_mean", "val_iou_mean", "val_dice_organ", "val_dice_lesion", "val_iou_lesion"):
        assert key in run.data.metrics, key
    assert run.data.metrics["val_dice_mean"] == pytest.approx(result["best"]["val_dice_mean"])
    assert run.data.params["loss._target_"] == cfg.loss._target_
    assert run.data.params["data.num_classes"] == "3"
    assert {"git_commit", "seed", "device", "amp", "amp_reason", "cpu"} <= run.data.tags.keys()
    chosen = hardware.resolve("auto", torch.device("cpu"))  # trainer.amp=auto: whatever this CPU runs natively
    assert str(chosen) in capsys.readouterr().out.splitlines()  # e.g. "amp: fp32 (CPU has AVX2, no native bf16)"
    assert (run.data.tags["amp"], run.data.tags["amp_reason"]) == (chosen.name, chosen.reason)
    for name in ("best.pt", "last.pt"):
        assert checkpoint.load(tmp_path / "checkpoints" / name)["precision"] == chosen.record()
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/best.pt", "checkpoints/last.pt"}
    assert {"config.yaml", "splits.json"} <= {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert [len(splits[k]) for k in ("train", "val", "test")] == [6, 1, 1]


def test_tracking_none_still_trains(tiny_phantom, tmp_path):
    result = train(tiny_config(tiny_phantom, tmp_path, overrides=["tracking=none", "trainer.amp=false"]))
    assert result["run_id"] is None and (tmp_path / "checkpoints" / "best.pt").exists()


def test_cosine_schedule_lowers_the_learning_rate(tiny_phantom, tmp_path, mlflow_store):
    result = train(tiny_config(tiny_phantom, tmp_path, overrides=["scheduler=cosine", "optimizer.lr=0.001", "trainer.max_epochs=2", "trainer.val_every=2"]))
    history = mlflow.MlflowClient(mlflow_store).get_metric_history(result["run_id"], "lr")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([1e-3, 0.5 * (1e-3 + 1e-6)])
