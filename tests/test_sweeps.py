"""Sweeps on the field's engines: an Optuna search (hydra-optuna-sweeper) and jobs launched through submitit."""

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline import project_root
from pipeline.models import checkpoint
from pipeline.tracking.sweep import dataset_name
from tests.conftest import TINY, TINY_MODEL, split_parent, wait_for_epoch
from tests.test_cli import named
from tests.test_make import make_dry_run
from tests.test_tracking_server import Server


def run_train(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pipeline.train", *args],
                          capture_output=True, text=True, cwd=project_root())
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def sweep_runs(mlflow_store: str, experiment: str) -> list:
    mlflow.set_tracking_uri(mlflow_store)
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


@pytest.fixture
def server_uri(tmp_path):
    """A new `mlflow server` on its own sqlite store, as `make mlflow-server` runs it."""
    server = Server(tmp_path / "server")
    yield server.uri
    server.kill()


@pytest.mark.slow  # an MLflow server and a make cv (the launcher's naming is tested fast below): `make test-slow`
def test_make_cv_on_data_named_by_its_dataset_json_nests_its_folds_in_a_parent_on_a_server(tiny_phantom, tmp_path,
                                                                                              server_uri):
    """make cv's multirun without tracking.experiment, on a server no run has used: the launching process names the
    parent's experiment from dataset.json, as its folds do (tests/test_cli.py: a grid on a fresh sqlite store)."""
    data, cv_dir = named(tiny_phantom, tmp_path / "data", "CV-Organs"), tmp_path / "cv"
    # the training line of make cv (the two after it score the folds)
    line = make_dry_run("cv", f"data.root={data}", *TINY, *TINY_MODEL["unet3d"], "tracking.log_model=false",
                        f"tracking.uri={server_uri}", "FOLDS=2", f"CV_DIR={cv_dir}")[-3]
    command = shlex.split(line)
    done = run_train(*command[command.index("pipeline.train") + 1:])
    assert "raised" not in done.stderr, done.stderr[-3000:]  # Hydra's warning for a callback that failed
    client = mlflow.MlflowClient(server_uri)
    (parent,), folds = split_parent(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    assert {client.get_experiment(r.info.experiment_id).name for r in [parent, *folds]} == {"CV-Organs"}
    assert {r.data.tags["mlflow.parentRunId"] for r in folds} == {parent.info.run_id} and len(folds) == 2
    assert {r.data.params["data.fold"] for r in folds} == {"0", "1"}
    assert parent.info.status == "FINISHED" and parent.data.tags["best_run_id"] in {r.info.run_id for r in folds}


def test_the_launching_process_names_the_dataset_as_its_jobs_will_from_dataset_json_alone(tiny_phantom, tmp_path):
    from pipeline.core.config import compose
    from pipeline.data.sources import read_dataset

    nameless = named(tiny_phantom, tmp_path / "Task09_Spleen", "")  # no name: the folder's
    pairs = tmp_path / "liver_study"
    (pairs / "images").mkdir(parents=True)
    (pairs / "labels").mkdir()
    cases = {"msd": [f"data.root={tiny_phantom}"], "nameless": [f"data.root={nameless}"],
             "given": [f"data.root={tiny_phantom}", "data.name=Mine"],
             "auto": ["data=auto", f"data.root={pairs}"], "folders": ["data=folders", f"data.root={pairs}",
                                                                      "data.class_names=[background,liver]"]}
    names = {case: dataset_name(compose("train", overrides).data) for case, overrides in cases.items()}
    assert names == {"msd": ("Phantom", None), "nameless": ("Task09_Spleen", None), "given": ("Mine", None),
                     "auto": ("liver_study", None), "folders": ("liver_study", None)}
    assert read_dataset(compose("train", [f"data.root={nameless}"]).data).name == "Task09_Spleen"  # as the jobs read it
    # the demo folder not made yet (data/phantom on a fresh clone): made once, here, before any job
    demo_data = compose("train", [f"paths.data={tmp_path / 'fresh'}", "data.synthesize.num_cases=2"]).data
    assert dataset_name(demo_data) == ("Phantom", None) and (tmp_path / "fresh" / "phantom" / "dataset.json").is_file()
    missing = compose("train", [f"data.root={tmp_path / 'nowhere'}"]).data
    assert dataset_name(missing) == (None, f"{tmp_path / 'nowhere' / 'dataset.json'}: not found; data.root must be "
                                           f"a dataset in msd layout (dataset.json, imagesTr/, labelsTr/)")


@pytest.mark.slow  # an Optuna sweep of several runs: `make test-slow`
def test_optuna_search_maximizes_the_best_val_dice_that_train_returns(tiny_phantom, tmp_path, mlflow_store):
    experiment = f"optuna-{tmp_path.name}"
    done = run_train("hparams_search=optuna", "hydra.sweeper.n_trials=2", f"data.root={tiny_phantom}", *TINY,
                     f"tracking.experiment={experiment}", f"hydra.sweep.dir={tmp_path}")
    (parent,), runs = split_parent(sweep_runs(mlflow_store, experiment))
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in [parent, *runs])
    best = max(runs, key=lambda r: r.data.metrics["best_val_dice_mean"])
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    # Optuna saw what train returned, and maximized it
    assert result["best_value"] == pytest.approx(best.data.metrics["best_val_dice_mean"])
    # the search space less data.patch_size, which TINY fixes on the command line (a given value is not searched)
    assert set(result["best_params"]) == {"optimizer.lr", "loss", "model.channels"}
    assert 1e-4 <= result["best_params"]["optimizer.lr"] <= 1e-2
    assert all(r.data.tags["sweep"] == str(tmp_path) for r in runs)
    assert f"sweep {tmp_path}: 2 runs" in done.stdout
    # one parent run with both trials nested under it; it names the best and records what was searched
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_dice_mean"] == pytest.approx(best.data.metrics["best_val_dice_mean"])
    assert parent.data.params["sweep.sweeper"].endswith("OptunaSweeper")
    assert "sweep.params.optimizer.lr" in parent.data.params  # the search space


@pytest.mark.slow  # three processes (~35 s): `make test-slow`
def test_submitit_local_launcher_runs_each_job_in_its_own_process(tiny_phantom, tmp_path, mlflow_store):
    experiment = f"submitit-{tmp_path.name}"
    run_train("--multirun", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "loss=dice,dicefocal",
              f"data.root={tiny_phantom}", *TINY, *TINY_MODEL["unet3d"], f"tracking.experiment={experiment}",
              f"hydra.sweep.dir={tmp_path}")
    (parent,), runs = split_parent(sweep_runs(mlflow_store, experiment))
    assert sorted(r.info.run_name for r in runs) == ["UNet_Adam_DiceFocalLoss", "UNet_Adam_DiceLoss"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}  # across processes too
    assert all(r.info.status == "FINISHED" for r in runs)
    logs = list((tmp_path / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # submitit's own job logs: the jobs ran as separate submitted processes
    assert len({r.data.tags["sweep"] for r in runs}) == 1


def test_slurm_launcher_config_composes_with_the_cluster_settings(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 240)


def task_processes(folder: Path) -> list[int]:
    """The pids of the submitit tasks (`python -m submitit.core._submit <folder>`) of jobs under `folder`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and any(str(folder).encode() in part for part in cmdline):
            found.append(int(proc.name))
    return found


@pytest.mark.slow  # submitit processes: `make test-slow`
def test_a_preempted_submitit_job_is_requeued_and_resumes_from_last_pt(tiny_phantom, tmp_path, mlflow_store):
    """submitit's preemption signal (USR2, what SLURM sends before a time limit) to the running job, as SLURM would:
    the job saves last.pt, submitit requeues it, and the requeued job finishes the one MLflow run."""
    experiment, epochs = f"requeue-{tmp_path.name}", 4
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--multirun", "hydra/launcher=submitit_local",
         "hydra.launcher.timeout_min=10", f"data.root={tiny_phantom}", *TINY, *TINY_MODEL["unet3d"],
         f"trainer.max_epochs={epochs}", "trainer.val_every=100", f"tracking.experiment={experiment}",
         f"hydra.sweep.dir={tmp_path}"], cwd=project_root(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "0" / "checkpoints" / "last.pt"
    wait_for_epoch(last, 1)
    tasks = task_processes(tmp_path / ".submitit")
    assert len(tasks) == 1
    os.kill(tasks[0], signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]

    out = "".join(p.read_text() for p in (tmp_path / ".submitit").rglob("*_log.out"))
    # submitit's own handler checkpointed and requeued the job, which then resumed
    assert "Caught signal SIGUSR2" in out and "Calling checkpoint method." in out and "Requeued job" in out
    assert f"requeued job: resuming {last}" in out and f"resuming {last} after epoch " in out
    _, runs = split_parent(sweep_runs(mlflow_store, experiment))
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient(mlflow_store).get_metric_history(runs[0].info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, epochs + 1))  # every epoch once, across both processes
    assert checkpoint.load(last)["epoch"] == epochs
