"""The command line as users type it: a multirun gives one MLflow run per job (make's side: tests/test_make.py)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline import project_root
from pipeline.core.config import compose
from pipeline.inference.predictor import mirrored_axes
from tests.conftest import CONF, TINY, TINY_MODEL, split_parent


def named(phantom: Path, folder: Path, name: str) -> Path:
    """The phantom cases under another dataset.json "name" (their folders linked, not copied)."""
    folder.mkdir()
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).symlink_to(phantom / sub)
    meta = json.loads((phantom / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps(meta | {"name": name}))
    return folder


def test_multirun_gives_each_job_its_own_folder_and_mlflow_run(tiny_phantom, tmp_path):
    """No tracking.experiment, on a store no run has used: the launching process names the parent's experiment from
    dataset.json (${data.name} stays null there; each job fills it from its data), so it is its jobs'."""
    data, sweep = named(tiny_phantom, tmp_path / "data", "Swept-Organs"), tmp_path / "sweep"
    store = f"sqlite:///{tmp_path}/store/mlflow.db"
    args = [
        "--multirun", "loss=dice,dicefocal", f"data.root={data}", *TINY, *TINY_MODEL["unet3d"],
        f"tracking.uri={store}", f"hydra.sweep.dir={sweep}",
    ]
    done = subprocess.run([sys.executable, "-m", "pipeline.train", *args],
                          capture_output=True, text=True, cwd=project_root())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "raised" not in done.stderr, done.stderr[-3000:]  # Hydra's warning for a callback that failed
    assert (sweep / "0" / "checkpoints" / "best.pt").exists() and (sweep / "1" / "checkpoints" / "best.pt").exists()
    client = mlflow.MlflowClient(store)
    (parent,), runs = split_parent(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    assert {client.get_experiment(r.info.experiment_id).name for r in [parent, *runs]} == {"Swept-Organs"}
    assert sorted(r.info.run_name for r in runs) == ["UNet_Adam_DiceFocalLoss", "UNet_Adam_DiceLoss"]
    # one parent run, the two jobs nested in it: what MLflow's UI folds into one row
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert parent.data.params["sweep.overrides"].startswith("loss=dice,dicefocal ") and parent.info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" and "val_dice_mean" in r.data.metrics for r in runs)
    for r in runs:  # each job's own command line, to re-run it
        loss = "dice" if r.info.run_name == "UNet_Adam_DiceLoss" else "dicefocal"
        assert r.data.tags["rerun"].startswith(f"python -m pipeline.train loss={loss} data.root=")
        assert r.data.tags["sweep"] == str(sweep) and r.data.tags["sweep_job"] == ("0" if loss == "dice" else "1")
    # the sweep's table: both runs, best first, with the override that differs between them (not the shared ones)
    table = done.stdout[done.stdout.index(f"sweep {sweep}: 2 runs"):].splitlines()
    best = {r.info.run_name: r.data.metrics["best_val_dice_mean"] for r in runs}
    first = max(best, key=best.get)
    assert first in table[2] and f"{best[first]:.4f}" in table[2]
    assert {line.split()[-1] for line in table[2:4]} == {"loss=dice", "loss=dicefocal"}
    assert parent.data.tags["best_overrides"] == table[2].split()[-1]
    assert parent.data.metrics["best_val_dice_mean"] == pytest.approx(best[first])


def test_the_override_a_defaults_entry_s_comment_suggests_composes():
    """`- augment: default   # transforms/augment=nnunet: ...`: the override a config's comment gives works as typed
    (conf/<name>.yaml's own, other groups' in the training config)."""
    hints = [(path, m.group(1)) for path in sorted(CONF.rglob("*.yaml")) for line in path.read_text().splitlines()
             if (m := re.match(r"\s+- [\w/@]+: \w+\s+#\s*(\S+=[^\s:]+):", line))]
    assert len(hints) >= 8 and (CONF / "transforms" / "default.yaml", "transforms/augment=nnunet") in hints
    for path, override in hints:
        compose(path.stem if path.parent == CONF else "train", [override])


@pytest.mark.parametrize("recipe,axes", [(None, (0, 1, 2)), ("auto", (0, 1, 2)), ("hippocampus", (0,)),
                                         ("hippocampus_quick", (0,))])
def test_the_shipped_recipes_mirror_the_axes_conf_predict_says_tta_mirrors(recipe, axes):
    cfg = compose("train", [f"experiment={recipe}"] if recipe else [])
    assert mirrored_axes([cfg]) == axes
