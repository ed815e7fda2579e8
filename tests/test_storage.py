"""Faults of the machine's storage, made for real: a tiny tmpfs (full), a read-only mount, a folder the user may not
write. Each is one line naming the path, the problem and the free space; nothing is left half-written."""

import json
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlflow
import nibabel as nib
import pytest
import torch

from pipeline.core.files import StorageError, atomic
from pipeline.data.transforms import loaders
from pipeline.models import checkpoint
from pipeline.training.completion import complete
from tests.conftest import tiny_config, training_process


@contextmanager
def tmpfs(path: Path, kilobytes: int, read_only: bool = False):
    """A small RAM disk at `path`: needs root and a kernel that lets this container mount (CI's runners do)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={kilobytes}k" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def weights(megabytes: float) -> torch.nn.Module:
    return torch.nn.Linear(int(megabytes * 2**20 / 4), 1, bias=False)


def test_a_checkpoint_too_big_for_the_disk_is_one_line_and_the_previous_file_survives(tmp_path):
    with tmpfs(tmp_path / "disk", kilobytes=1024) as disk:
        target = disk / "checkpoints" / "last.pt"
        checkpoint.save(target, weights(0.3), {"epoch": 1})
        with pytest.raises(StorageError) as refused:
            checkpoint.save(target, weights(0.8), {"epoch": 2})  # 0.3 + 0.8 MB (old and temp) exceed 1 MB
        message = str(refused.value)
        assert message.startswith(f"{target}: no space left on device; ")
        assert message.endswith(f" MB free on {disk}") and "\n" not in message
        free = float(message.split("; ")[1].split(" MB")[0])
        assert 0.5 < free < 0.75  # 1 MB less the 0.3 MB file kept: the partial temp file is gone
        assert checkpoint.load(target)["config"] == {"epoch": 1}  # whole, the old content
        assert [p.name for p in target.parent.iterdir()] == ["last.pt"]  # no temp file left


def test_a_read_only_file_system_is_one_line_naming_the_path(tmp_path):
    with tmpfs(tmp_path / "ro", kilobytes=64, read_only=True) as disk:
        refused = rf"^{disk}/run/best\.pt: read-only file system; 0\.1 MB free on {disk}$"
        with pytest.raises(StorageError, match=refused):
            checkpoint.save(disk / "run" / "best.pt", weights(0.01), {})


@pytest.fixture
def locked_folder():
    """A folder under /tmp that every user can enter and nobody but root can write (pytest's own tmp_path lies
    under a folder only its owner can enter)."""
    parent = Path(tempfile.mkdtemp(prefix="pipeline-locked-"))
    parent.chmod(0o755)
    (parent / "locked").mkdir(mode=0o555)
    yield parent / "locked"
    (parent / "locked").chmod(0o755)
    shutil.rmtree(parent)


def test_a_folder_without_write_permission_is_one_line_naming_the_path(locked_folder):
    """Root may write anywhere, so the write runs in a forked child that has dropped to the user `nobody`."""
    folder = locked_folder
    read, write = os.pipe()
    if (pid := os.fork()) == 0:  # the child: report what the write raised through the pipe, then leave at once
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            with atomic(folder / "labels.nii.gz") as tmp:
                tmp.write_text("x")
            outcome = "written"
        except BaseException as err:  # noqa: BLE001 - whatever it is, the parent asserts on it
            outcome = f"{type(err).__name__}: {err}"
        os.write(write, outcome.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    outcome = os.read(read, 4096).decode()
    assert outcome.startswith(f"StorageError: {folder}/labels.nii.gz: permission denied; "), outcome
    assert list(folder.iterdir()) == []


def test_a_failure_that_is_not_the_storage_is_left_as_it_is(tmp_path):
    with pytest.raises(json.JSONDecodeError):
        with atomic(tmp_path / "x.json") as tmp:
            tmp.write_text("{")
            json.loads(tmp.read_text())  # a writer that checks its own output and fails
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a training run on a filling disk: `make test-slow`
def test_training_on_a_disk_that_fills_up_stops_with_one_line_and_the_last_good_checkpoint(tiny_phantom, tmp_path,
                                                                                          mlflow_store):
    """The run folder on a 4 MB tmpfs; once epoch 1's checkpoints are written, a file takes the rest of it."""
    with tmpfs(tmp_path / "disk", kilobytes=4096) as disk:
        run_dir = disk / "run"
        proc, last = training_process(tiny_phantom, run_dir, "trainer.max_epochs=50", outputs=tmp_path / "outputs")
        fill(disk)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1, stderr[-2000:]
        assert "Traceback" not in stderr and "Logging error" not in stderr
        line = stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: {run_dir}/") and ": no space left on device; 0.0 MB free on " in line
        assert line.endswith(f"; last good checkpoint: {last}")
        saved = checkpoint.load(last)  # whole: the one written before the disk filled
        assert saved["epoch"] >= 1 and not list(last.parent.glob(".tmp-*"))
        run = mlflow.MlflowClient(mlflow_store).get_run(saved["run_id"])
        assert run.info.status == "FAILED"
        assert run.data.tags["stop_reason"] == line.removeprefix("error: ")


def fill(disk: Path) -> None:
    """Take every free byte of `disk`, 64 kB at a time."""
    with open(disk / "filler", "wb") as f:
        while shutil.disk_usage(disk).free > 0:
            try:
                f.write(b"\0" * 65536)
                f.flush()
            except OSError:
                return


def test_a_folder_inference_on_a_disk_that_fills_up_stops_at_the_first_refused_label_map(threshold_ckpt, tiny_phantom,
                                                                                        tmp_path, monkeypatch):
    from pipeline.inference import predictor as inference

    predict_one, done = inference.predict_one, []

    def predict_then_fill(*args, **kwargs):
        predict_one(*args, **kwargs)
        done.append(args[2])
        if len(done) == 1:
            fill(args[2].parent)

    monkeypatch.setattr(inference, "predict_one", predict_then_fill)
    with tmpfs(tmp_path / "disk", kilobytes=2048) as disk:
        with pytest.raises(StorageError) as refused:
            inference.infer(threshold_ckpt(), tiny_phantom / "imagesTr", disk)
        second = disk / sorted(p.name for p in (tiny_phantom / "imagesTr").iterdir())[1]
        assert str(refused.value) == (f"{second}: no space left on device; 0.0 MB free on {disk}; 1 volumes written "
                                      "before it (a re-run skips them)")
        assert nib.load(done[0]).shape and sorted(p.name for p in disk.iterdir()) == sorted([done[0].name, "filler"])


def test_a_disk_cache_that_cannot_fit_is_refused_before_training(tiny_phantom, tmp_path):
    cfg = tiny_config(tiny_phantom, tmp_path, overrides=["data.cache=disk"])
    splits = complete(cfg).splits
    with tmpfs(tmp_path / "disk", kilobytes=64) as disk:
        cfg.paths.outputs = str(disk)
        with pytest.raises(StorageError, match=rf"^{disk}/cache/\w+: the disk cache needs about [\d.]+ MB \(set "
                                               rf"data.cache=none, or paths.outputs= on another disk\); 0\.1 MB free "
                                               rf"on {disk}$"):
            loaders(cfg, splits["train"], splits["val"])


def test_an_mlflow_store_on_a_read_only_disk_is_one_warning_and_training_goes_on(tmp_path, caplog):
    """Tracking never stops a run: its store failing is one warning (not MLflow's minute of retries and a trace)."""
    from pipeline.tracking.runs import MLflowTracker

    with tmpfs(tmp_path / "ro", kilobytes=64, read_only=True) as disk:
        tracker = MLflowTracker(f"sqlite:///{disk}/mlflow.db", "storage-test", local_dir=str(tmp_path / "run"))
        tracker.start("UNet_Adam_DiceLoss", {}, {})
        tracker.log_metrics({"train_loss": 0.5}, step=1)
    assert tracker.run_id is None
    assert caplog.messages == [f"MLflow tracking at sqlite:///{disk}/mlflow.db failed in start (StorageError: {disk}/"
                               f"mlflow.db: read-only file system; 0.1 MB free on {disk}); no more tracking for this "
                               f"run; metrics.jsonl and checkpoints stay in {tmp_path / 'run'}"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("train_loss") == 1
