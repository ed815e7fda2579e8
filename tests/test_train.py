"""One-epoch training runs on a tiny phantom set, checked through the checkpoint and the MLflow store."""

import json
import math
import signal
from types import SimpleNamespace

import mlflow
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipeline.core import hardware
from pipeline.core.errors import RunStopped
from pipeline.data.transforms import loaders
from pipeline.evaluation.metrics import SegmentationScores
from pipeline.models import checkpoint
from pipeline.training import engine
from pipeline.training.run import setup, train
from tests.conftest import compose_config, tiny_config

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
    for key in ("train_loss", "lr", "epoch_time", "val_dice_mean", "val_iou_mean", "val_dice_organ", "val_dice_lesion",
                "val_iou_lesion"):
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


def test_ema_checkpoints_the_moving_average_it_validated_and_scores_the_raw_weights_beside_it(tiny_phantom, tmp_path,
                                                                                            mlflow_store):
    result = train(tiny_config(tiny_phantom, tmp_path, overrides=["trainer.ema=0.5", "trainer.amp=false",
                                                                  "trainer.deterministic=true", "trainer.max_epochs=3",
                                                                  "trainer.val_every=1"]))
    last = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert last["ema_updates"] == result["steps"]  # one update after every optimizer step
    assert any(not torch.equal(last["state_dict"][k], w) for k, w in last["raw_state_dict"].items())
    job = setup(OmegaConf.create(last["config"]))
    hardware.channels_last(job.model)  # as trained: the same kernels, the same voxels
    _, val = loaders(OmegaConf.create(last["config"]), job.splits["train"], job.splits["val"])
    for weights, logged in (("state_dict", "val_dice_mean"), ("raw_state_dict", "raw_val_dice_mean")):
        job.model.load_state_dict(last[weights])
        scores = engine.validate(job.model, val, job.inferer, SegmentationScores(job.class_names), job.device, None)
        assert scores["val_dice_mean"] == pytest.approx(result["history"][-1][logged], abs=1e-6), weights


def test_cosine_schedule_lowers_the_learning_rate(tiny_phantom, tmp_path, mlflow_store):
    result = train(tiny_config(tiny_phantom, tmp_path, overrides=["scheduler=cosine", "optimizer.lr=0.001",
                                                                  "trainer.max_epochs=2", "trainer.val_every=2"]))
    history = mlflow.MlflowClient(mlflow_store).get_metric_history(result["run_id"], "lr")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([1e-3, 0.5 * (1e-3 + 1e-6)])


def test_budget_estimate_leaves_out_the_first_epoch_and_caps_at_max_epochs():
    trainer = OmegaConf.create({"max_minutes": 1.0, "max_epochs": 1000})
    # 60 s budget, 15 s spent; the first epoch (10 s) paid one-off costs, so epochs take 5 s: 9 more fit
    assert engine.budgeted_epochs(trainer, 2, 15.0, [10.0, 5.0]) == 11
    assert engine.budgeted_epochs(OmegaConf.merge(trainer, {"max_epochs": 8}), 2, 15.0, [10.0, 5.0]) == 8
    assert engine.budgeted_epochs(trainer, 3, 62.0, [30.0, 16.0, 16.0]) == 3  # over budget: this epoch is the last
    assert engine.budgeted_epochs(OmegaConf.merge(trainer, {"max_minutes": None}), 2, 15.0, [10.0, 5.0]) is None
    assert engine.budgeted_epochs(OmegaConf.merge(trainer, {"fit_to_budget": False}), 2, 15.0, [10.0, 5.0]) is None
    # validations of 10 s every 2 epochs and 1 s of checkpoints an epoch, 40 s left after epoch 2's training: epoch
    # 2's validation (10 s), epoch 3 with its own as the last (6 + 10), epoch 4 as the last (6 + 6 + 10) is 32 s; a
    # fifth would be 48
    every2 = OmegaConf.merge(trainer, {"val_every": 2})
    assert engine.budgeted_epochs(every2, 2, 20.0, [10.0, 5.0], val_seconds=[10.0], overhead=2.0) == 4


@pytest.mark.parametrize("name", ["cosine", "onecycle", "poly", "warmup_cosine"])
def test_a_rebuilt_schedule_continues_as_if_built_for_that_length(name, tmp_path):
    def schedule(epochs):
        cfg = compose_config("train", [f"scheduler={name}", f"trainer.max_epochs={epochs}", "optimizer.lr=0.01"],
                             tmp_path)
        return instantiate(cfg.scheduler)(optimizer)

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = schedule(100)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    scheduler = engine.reschedule(schedule, optimizer, 10, 4)  # after 4 epochs the budget says 10 in all
    rebuilt = [optimizer.param_groups[0]["lr"]]
    for _ in range(6):
        optimizer.step()
        scheduler.step()
        rebuilt.append(optimizer.param_groups[0]["lr"])

    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    optimizer = reference
    scheduler, fresh = schedule(10), []
    for epoch in range(10):
        if epoch >= 4:
            fresh.append(reference.param_groups[0]["lr"])
        reference.step()
        scheduler.step()
    fresh.append(reference.param_groups[0]["lr"])
    assert rebuilt == pytest.approx(fresh, rel=1e-9)


def train_on_a_fake_clock(phantom, run_dir, monkeypatch, *overrides: str) -> dict:
    """A 60-s budgeted run on a fake clock: each training step takes 1 s (6 an epoch), each validation 9 s."""
    clock = [0.0]
    monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    step, validate = engine.batch_loss, engine.validate
    monkeypatch.setattr(engine, "batch_loss", lambda *a: clock.__setitem__(0, clock[0] + 1) or step(*a))
    monkeypatch.setattr(engine, "validate", lambda *a: clock.__setitem__(0, clock[0] + 9) or validate(*a))
    return train(tiny_config(phantom, run_dir, overrides=["tracking=none", "scheduler=cosine",
                                                          "trainer.max_epochs=1000", "trainer.max_minutes=1",
                                                          *overrides]))


@pytest.mark.slow  # a real clock (the fake-clock tests stay): `make test-slow`
def test_a_time_budget_ends_the_run_with_its_validations_at_the_budget(tiny_phantom, tmp_path, monkeypatch):
    """Each training step "takes" 1 s (6 steps an epoch) and each validation 9 s on a fake clock: a 60 s budget with a
    validation after the first epoch (to time one) and every 2 epochs ends after epoch 4 (4 x 6 + 3 x 9 = 51 s; a
    fifth epoch and its validation would end at 66 s)."""
    result = train_on_a_fake_clock(tiny_phantom, tmp_path, monkeypatch, "trainer.val_every=2")
    assert result["epochs"] == 4  # though max_epochs allowed 1000
    last = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert last["run_minutes"] * 60 == 51 and last["val_seconds"] == [9.0] * 3 and last["overhead_seconds"] == 0
    assert last["scheduler"]["T_max"] == 4 and last["end_epoch"] == 4
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-6)  # annealed to eta_min at the budget
    # before the first validation was timed 10 epochs seemed to fit; from epoch 2 on, with its 9 s, 4
    assert [h["planned_epochs"] for h in result["history"]] == [10, 4, 4, 4]
    assert [h["epoch"] for h in result["history"] if "val_dice_mean" in h] == [1, 2, 4]


def test_an_auto_cadence_spends_a_twentieth_of_training_on_validation(tiny_phantom, tmp_path, monkeypatch):
    """val_every=auto: 6-s epochs and 9-s validations validate every ceil(9 / (0.05 x 6)) = 30 epochs; a 60 s budget
    then trains 7 epochs with only the timing validation after the first and the last (7 x 6 + 2 x 9 = 60 s), where
    val_every=2 trained 4."""
    auto = OmegaConf.create({"val_every": "auto"})
    assert engine.val_every(auto, [10.0, 5.0], []) == 1  # no validation timed yet
    assert engine.val_every(auto, [10.0, 5.0], [10.0]) == 40  # the first epoch's one-off costs left out
    assert engine.val_every(auto, [60.0, 60.0], [2.0]) == 1
    assert engine.val_every(OmegaConf.create({"val_every": 7}), [1.0], [100.0]) == 7
    result = train_on_a_fake_clock(tiny_phantom, tmp_path, monkeypatch, "trainer.val_every=auto")
    assert result["epochs"] == 7
    assert [h["epoch"] for h in result["history"] if "val_dice_mean" in h] == [1, 7]
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["run_minutes"] * 60 == 60


@pytest.mark.slow  # two runs of 8 epochs: `make test-slow`
def test_a_resumed_budgeted_run_refits_its_schedule_as_an_unbroken_run_does(tiny_phantom, tmp_path, monkeypatch):
    """last.pt holds the resolved config (the schedule's length frozen at max_epochs=1000); a budget that changes
    the run's length after a resume must still end the schedule there (it once rebuilt it 1000 epochs long)."""
    # the budget's estimate, without a clock: 8 epochs fit while epochs 1-3 run, 6 from epoch 4 (a faster machine)
    monkeypatch.setattr(engine, "budgeted_epochs", lambda trainer, epoch, *_: 8 if epoch <= 3 else 6)
    overrides = ["tracking=none", "scheduler=cosine", "trainer.max_epochs=1000", "trainer.max_minutes=10",
                 "trainer.val_every=100"]
    unbroken = train(tiny_config(tiny_phantom, tmp_path / "unbroken", overrides=overrides))

    steps = iter(range(1, 10_000))  # SIGTERM at the first step of epoch 4: last.pt holds epoch 3
    monkeypatch.setattr(engine, "stopping", lambda job: signal.SIGTERM if next(steps) == 3 * len(job.train_loader) + 1
                        else None)
    with pytest.raises(RunStopped, match="interrupted after epoch 3"):
        train(tiny_config(tiny_phantom, tmp_path / "broken", overrides=overrides))
    assert checkpoint.load(tmp_path / "broken" / "checkpoints" / "last.pt")["scheduler"]["T_max"] == 8
    monkeypatch.setattr(engine, "stopping", lambda job: None)
    resumed = train(OmegaConf.create({"resume": str(tmp_path / "broken")}))

    assert resumed["epochs"] == unbroken["epochs"] == 6
    lrs = [[h["lr"] for h in run["history"]] for run in (unbroken, resumed)]
    assert lrs[1] == pytest.approx(lrs[0], rel=1e-9)
    last = checkpoint.load(tmp_path / "broken" / "checkpoints" / "last.pt")
    assert last["scheduler"]["T_max"] == 6
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-6)  # annealed to eta_min at the end
