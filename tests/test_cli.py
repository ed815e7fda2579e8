"""The command line as users type it: make passes overrides to Hydra unchanged;
a multirun gives one MLflow run per job."""

import os
import subprocess
import sys

import mlflow
import pytest

from pipeline import project_root
from tests.conftest import TINY, TINY_MODEL, split_parent


def make_dry_run(target: str, *args: str) -> list[str]:
    """The commands `make -n <target> <args>` would run."""
    # A clean environment: under `make test` the parent make's MAKEFLAGS would otherwise reach this make too.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    dry = subprocess.run(["make", "--no-print-directory", "-n", target, *args],
                         capture_output=True, text=True, cwd=project_root(), env=env, check=True)
    return dry.stdout.strip().splitlines()


def test_make_passes_every_override_to_hydra_unchanged_and_in_order():
    overrides = ["model=unet3d", "loss=dicefocal", "optimizer=sgd", "trainer.max_epochs=3", "+extra.list=[1,2]"]
    command = make_dry_run("train", *overrides)[-1]
    assert command.endswith("-m pipeline.train " + " ".join(f"'{o}'" for o in overrides)), command


def test_make_cv_gives_its_evaluations_the_tracking_overrides_and_nothing_else():
    train, cv, test = make_dry_run("cv", "experiment=hippocampus", "tracking=none", "data.batch_size=2",
                                   "CV_DIR=outputs/cv/x")[-3:]
    assert train.endswith("hydra.sweep.dir=outputs/cv/x 'experiment=hippocampus' 'tracking=none' "
                          "'data.batch_size=2'"), train
    assert cv.endswith("-m pipeline.evaluate ckpt=outputs/cv/x split=cv output=outputs/cv/x/cv 'tracking=none'"), cv
    assert test.endswith("if_empty=skip output=outputs/cv/x/ensemble_test 'tracking=none'"), test


def test_make_cv_folds_sets_the_number_of_folds_and_is_no_hydra_key():
    train = make_dry_run("cv", "experiment=auto", "FOLDS=4", "CV_DIR=outputs/cv/x")[-3]
    assert "--multirun 'data.fold=range(0,4)' data.split.folds=4 hydra.sweep.dir=outputs/cv/x" in train, train
    assert train.endswith("'experiment=auto'") and "FOLDS=" not in train, train


def test_multirun_gives_each_job_its_own_folder_and_mlflow_run(tiny_phantom, tmp_path, mlflow_store):
    experiment = f"multirun-{tmp_path.name}"
    args = [
        "--multirun", "loss=dice,dicefocal", f"data.root={tiny_phantom}", *TINY, *TINY_MODEL["unet3d"],
        f"tracking.experiment={experiment}", f"hydra.sweep.dir={tmp_path}",
    ]
    done = subprocess.run([sys.executable, "-m", "pipeline.train", *args],
                          capture_output=True, text=True, cwd=project_root())
    assert done.returncode == 0, done.stderr[-3000:]
    assert ((tmp_path / "0" / "checkpoints" / "best.pt").exists()
            and (tmp_path / "1" / "checkpoints" / "best.pt").exists())
    mlflow.set_tracking_uri(mlflow_store)
    (parent,), runs = split_parent(mlflow.search_runs(experiment_names=[experiment], output_format="list"))
    assert sorted(r.info.run_name for r in runs) == ["UNet_Adam_DiceFocalLoss", "UNet_Adam_DiceLoss"]
    # one parent run, the two jobs nested in it: what MLflow's UI folds into one row
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert parent.data.params["sweep.overrides"].startswith("loss=dice,dicefocal ") and parent.info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" and "val_dice_mean" in r.data.metrics for r in runs)
    for r in runs:  # each job's own command line, to re-run it
        loss = "dice" if r.info.run_name == "UNet_Adam_DiceLoss" else "dicefocal"
        assert r.data.tags["rerun"].startswith(f"python -m pipeline.train loss={loss} data.root=")
        assert r.data.tags["sweep"] == str(tmp_path) and r.data.tags["sweep_job"] == ("0" if loss == "dice" else "1")
    # the sweep's table: both runs, best first, with the override that differs between them (not the shared ones)
    table = done.stdout[done.stdout.index(f"sweep {tmp_path}: 2 runs"):].splitlines()
    best = {r.info.run_name: r.data.metrics["best_val_dice_mean"] for r in runs}
    first = max(best, key=best.get)
    assert first in table[2] and f"{best[first]:.4f}" in table[2]
    assert {line.split()[-1] for line in table[2:4]} == {"loss=dice", "loss=dicefocal"}
    assert parent.data.tags["best_overrides"] == table[2].split()[-1]
    assert parent.data.metrics["best_val_dice_mean"] == pytest.approx(best[first])
