"""Crashes lose nothing: SIGKILL then resume equals an unbroken run; seeds reproduce; checkpoints cannot run code."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from omegaconf import OmegaConf

from pipeline import project_root
from pipeline.core.errors import InputError
from pipeline.data.transforms import cache_mode
from pipeline.models import checkpoint
from pipeline.training.completion import complete
from pipeline.training.run import train
from tests.conftest import tiny_config, training_process

DETERMINISTIC = ["trainer.amp=false", "trainer.deterministic=true", "trainer.max_epochs=4", "trainer.val_every=1"]


def history(store: str, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(mlflow.MlflowClient(store).get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow  # two full runs compared: `make test-slow`
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


@pytest.mark.parametrize("extra", [pytest.param([], marks=pytest.mark.slow),  # the EMA case resumes the weights too
                                   ["trainer.ema=0.5"]], ids=["weights", "ema"])
def test_resume_after_sigkill_matches_an_unbroken_run(extra, tiny_phantom, tmp_path, mlflow_store, caplog):
    unbroken = train(tiny_config(tiny_phantom, tmp_path / "unbroken", overrides=DETERMINISTIC + extra))

    proc, last = training_process(tiny_phantom, tmp_path / "killed", *DETERMINISTIC, *extra, epoch=2)
    proc.send_signal(signal.SIGKILL)  # mid-epoch 3: no chance to clean up
    proc.wait()
    killed_at = checkpoint.load(last)["epoch"]
    assert 2 <= killed_at < 4, "the run finished before it could be killed"

    # `make train resume=<last.pt>`, in this process: a start costs ~10 s
    train(OmegaConf.create({"resume": str(last)}))
    resumed = checkpoint.load(last)
    assert resumed["epoch"] == 4
    assert f"(epochs {killed_at + 1}-4 in " in caplog.messages[-1]
    assert f" min, resumed after epoch {killed_at}); checkpoints in" in caplog.messages[-1]
    run_id = resumed["run_id"]
    assert mlflow.MlflowClient(mlflow_store).get_run(run_id).info.status == "FINISHED"
    for key in ("train_loss", "val_dice_mean", "lr") + (("raw_val_dice_mean",) if extra else ()):
        assert (history(mlflow_store, run_id, key)[-1]
                == pytest.approx(history(mlflow_store, unbroken["run_id"], key)[-1], abs=1e-6)), key
    whole = checkpoint.load(tmp_path / "unbroken" / "checkpoints" / "last.pt")
    for weights in ("state_dict", "raw_state_dict") if extra else ("state_dict",):  # with ema: the average, the model
        for name, tensor in whole[weights].items():
            torch.testing.assert_close(resumed[weights][name], tensor, atol=1e-6, rtol=0, msg=f"{weights} {name}")
    steps = [m.step for m in mlflow.MlflowClient(mlflow_store).get_metric_history(run_id, "train_loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4]  # one MLflow run, the epoch counter carried on


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "config": Exploit()}, path)  # torch.save pickles whatever it is given
    with pytest.raises(InputError, match="evil.pt: not a readable checkpoint: it holds Python objects that could run "
                                         "code, which weights_only=True refuses to load"):
        checkpoint.load(path)
    assert not marker.exists()


def test_an_oversized_memory_cache_falls_back_to_disk(tiny_phantom, tmp_path):
    cfg = tiny_config(tiny_phantom, tmp_path, overrides=["data.cache=memory", "data.cache_ram_gb=0.001"])
    dataset = complete(cfg).dataset
    assert cache_mode(cfg, dataset.cases) == "disk"  # about 8 x 0.6 MB x 2 would not fit in 1 MB
    cfg = tiny_config(tiny_phantom, tmp_path, overrides=["data.cache=memory", "data.cache_ram_gb=1"])
    complete(cfg)
    assert cache_mode(cfg, dataset.cases) == "memory"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_saves_last_pt_marks_the_run_killed_and_says_how_to_continue(sig, code, tiny_phantom, tmp_path,
                                                                                mlflow_store):
    """A real Ctrl-C (SIGINT) or SLURM's SIGTERM to a training process, after its first epoch."""
    run_dir = tmp_path / "run"
    proc, last = training_process(tiny_phantom, run_dir, "trainer.max_epochs=200", "trainer.val_every=100")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-2000:]
    saved = checkpoint.load(last)  # whole (written atomically), the end of the last whole epoch
    assert 1 <= saved["epoch"] < 200 and "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"interrupted after epoch {saved['epoch']} (step ")
    assert line.endswith(f"); continue with: make train resume={run_dir}")
    assert mlflow.MlflowClient(mlflow_store).get_run(saved["run_id"]).info.status == "KILLED"


def test_a_second_ctrl_c_exits_at_once_without_a_traceback():
    script = ("import os, signal, time\nfrom pipeline.core.interrupts import Interrupts\n"
              "with Interrupts() as stop:\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    assert stop.signal == signal.SIGINT\n"
              "    print('asked to stop', flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(30)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130 and done.stdout == "asked to stop\n"
    assert done.stderr.strip().splitlines()[-1] == "interrupted again: exiting now, without saving"
    assert "Traceback" not in done.stderr


def test_a_nan_loss_stops_with_one_line_naming_the_step_the_checkpoint_and_the_settings(tiny_phantom, tmp_path):
    from pipeline.core.errors import RunStopped

    cfg = tiny_config(tiny_phantom, tmp_path, overrides=["optimizer.lr=1e30", "trainer.grad_clip=null",
                                                         "trainer.max_epochs=3", "tracking=none"])
    with pytest.raises(RunStopped) as stop:
        train(cfg)
    message = str(stop.value)
    assert "\n" not in message and ": the training loss is nan; last good checkpoint: " in message
    assert message.startswith("epoch ") and " step " in message.split(":")[0]
    assert message.endswith("lower optimizer.lr, set trainer.grad_clip (e.g. 1.0) or trainer.amp=false")
    named = message.split("last good checkpoint: ")[1].split(";")[0]
    assert named == "none yet" or checkpoint.load(named)["epoch"] >= 1  # what it names loads


def truncate(path, keep: float = 0.5) -> int:
    """Cut a file as an interrupted copy would; returns the bytes left."""
    data = path.read_bytes()[: int(path.stat().st_size * keep)]
    path.write_bytes(data)
    return len(data)


def test_a_truncated_last_pt_given_to_resume_is_one_line_naming_the_file(tmp_path):
    last = checkpoint.save(tmp_path / "run" / "checkpoints" / "last.pt", torch.nn.Linear(100, 2), {}, optimizer={})
    size = truncate(last)
    done = subprocess.run([sys.executable, "-m", "pipeline.train", f"resume={tmp_path / 'run'}"], cwd=project_root(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"error: {last}: not a readable checkpoint: truncated or corrupt "
                                                    f"({size} bytes; an interrupted copy or a full disk?)")


def test_resume_true_skips_a_newer_unreadable_last_pt_and_says_which_it_took(tmp_path, caplog):
    from pipeline.training.run import resume_from

    runs = tmp_path / "outputs" / "runs" / "train"
    good = checkpoint.save(runs / "2026-01-01_10-00-00" / "checkpoints" / "last.pt", torch.nn.Linear(4, 2),
                           {"epoch": 3}, optimizer={})
    empty = runs / "2026-01-02_10-00-00" / "checkpoints" / "last.pt"
    empty.parent.mkdir(parents=True)
    empty.write_bytes(b"")
    os.utime(good, (time.time() - 60, time.time() - 60))  # the empty one is the newest
    path, state = resume_from(OmegaConf.create({"resume": True, "paths": {"outputs": str(tmp_path / "outputs")}}))
    assert path == good and state["config"] == {"epoch": 3}
    assert caplog.messages[-1] == (f"resume=true: skipped {empty}: not a readable checkpoint: the file is empty; "
                                   f"resuming {good} instead")
    good.unlink()
    with pytest.raises(InputError, match=rf"^{runs}: no run with a readable last.pt to resume \({empty}: not a "):
        resume_from(OmegaConf.create({"resume": True, "paths": {"outputs": str(tmp_path / "outputs")}}))


def test_resume_auto_continues_the_run_folders_own_last_pt_and_starts_afresh_without_one(tmp_path, caplog):
    from pipeline.training.run import resume_from

    def auto(run_dir):
        return resume_from(OmegaConf.create({"resume": "auto", "paths": {"run_dir": str(run_dir)}}))

    assert auto(tmp_path / "never_started") is None
    last = checkpoint.save(tmp_path / "stopped" / "checkpoints" / "last.pt", torch.nn.Linear(4, 2), {"epoch": 3},
                           optimizer={})
    path, state = auto(tmp_path / "stopped")
    assert path == last and state["config"] == {"epoch": 3}
    assert caplog.messages[-1] == f"resume=auto: resuming {last}"


def test_a_finished_run_given_resume_auto_returns_without_training_again(tiny_phantom, tmp_path, mlflow_store,
                                                                         caplog):
    # `make cv CV_DIR=<a stopped cv> resume=auto`: the folds that had finished must not train again
    first = train(tiny_config(tiny_phantom, tmp_path / "fold"))
    again = train(tiny_config(tiny_phantom, tmp_path / "fold", overrides=["resume=auto"]))
    assert first["epochs"] == again["epochs"] == 1 and len(first["step_losses"]) > 0
    assert again["step_losses"] == [] and again["run_id"] == first["run_id"]
    assert "(finished before, at epoch 1: nothing left to train); checkpoints in" in caplog.messages[-1]
