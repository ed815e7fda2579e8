"""trainer=ddp under torchrun on the CPU (gloo, 2 ranks): the ranks agree, rank 0 alone tracks and writes, the
validation scores of uneven shares reduce to the mean over every volume, and one seed gives one result.

Each rank reports what it validated through $PIPELINE_DDP_DEBUG_DIR (pipeline.core.distributed.debug): rank<r>.jsonl
with its cases, its own per-volume scores and the reduced metrics of every validation, and the log of every epoch.
"""

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import project_root
from pipeline.core import distributed
from pipeline.evaluation.metrics import SegmentationScores
from tests.conftest import TINY, TINY_MODEL

WORLD = 2
# 8 phantom cases: 1 test, 3 val (2 + 1 across the ranks: uneven), 4 train (2 per rank); fp32 and deterministic
# algorithms so that two runs can be compared.
DDP = [*TINY, *TINY_MODEL["unet3d"], "trainer=ddp", "trainer.max_epochs=3", "data.split.val=0.375", "optimizer.lr=0.01",
       "trainer.amp=false", "trainer.deterministic=true"]


def torchrun(phantom: Path, run_dir: Path, overrides=(), resume: Path | None = None) -> dict:
    """One 2-rank run in its own folder and MLflow experiment: the process, each rank's debug records, the
    experiment."""
    experiment = f"ddp-{uuid.uuid4().hex[:8]}"
    launcher = Path(sys.executable).with_name("torchrun")
    launcher = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    args = [f"data.root={phantom}", *DDP, *overrides, f"tracking.experiment={experiment}", f"hydra.run.dir={run_dir}",
            f"paths.outputs={run_dir}/outputs"]
    if resume is not None:  # the checkpoint's own config; only the Hydra folder of this process is set
        args = [f"resume={resume}", f"hydra.run.dir={run_dir}"]
    # MLFLOW_TRACKING_URI too
    env = os.environ | {distributed.DEBUG_DIR: str(run_dir / "ddp_debug"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, "--standalone", f"--nproc_per_node={WORLD}", "-m", "pipeline.train", *args],
                          cwd=project_root(), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = [[json.loads(line) for line in (run_dir / "ddp_debug" / f"rank{r}.jsonl").read_text().splitlines()]
               for r in range(WORLD)]
    return {"proc": proc, "records": records, "experiment": experiment, "run_dir": run_dir}


def of_kind(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["kind"] == kind]


@pytest.fixture(scope="module")
def ddp_run(tiny_phantom, tmp_path_factory, mlflow_store) -> dict:
    return torchrun(tiny_phantom, tmp_path_factory.mktemp("ddp"))


@pytest.mark.slow  # the 2-rank run (every test of it): `make test-slow`
def test_ranks_share_the_cases_and_agree_on_every_metric(ddp_run):
    splits = json.loads((ddp_run["run_dir"] / "splits.json").read_text())
    (first,), (second,) = (of_kind(r, "shares") for r in ddp_run["records"])
    assert (len(first["train"]) == len(second["train"]) == 2
            and sorted(first["train"] + second["train"]) == sorted(splits["train"]))
    assert ([len(first["val"]), len(second["val"])] == [2, 1]
            and sorted(first["val"] + second["val"]) == sorted(splits["val"]))
    ranks = [of_kind(r, "validation") for r in ddp_run["records"]]
    assert [len(v) for v in ranks] == [3, 3]  # val_every=1, 3 epochs
    assert [v[0]["cases"] for v in ranks] == [first["val"], second["val"]]
    for first, second in zip(*ranks):
        assert first["metrics"] == second["metrics"]  # the same reduced numbers, bit for bit
    logs = [[e["log"] for e in of_kind(r, "epoch")] for r in ddp_run["records"]]
    assert [e["train_loss"] for e in logs[0]] == [e["train_loss"] for e in logs[1]]  # the mean over both ranks
    assert [e["lr"] for e in logs[0]] == [e["lr"] for e in logs[1]]


@pytest.mark.slow  # the 2-rank run: `make test-slow`
def test_only_rank_zero_speaks_on_the_console_and_in_the_job_log(ddp_run):
    lines = [f"epoch {e:3d}  loss" for e in (1, 2, 3)]  # the validation line of each epoch (val_every=1)
    assert [ddp_run["proc"].stdout.count(line) for line in lines] == [1, 1, 1]
    job_log = (ddp_run["run_dir"] / "train.log").read_text()
    assert [job_log.count(f"[pipeline.training.engine][INFO] {line}") for line in lines] == [1, 1, 1]


@pytest.mark.slow  # the 2-rank run: `make test-slow`
def test_uneven_shares_reduce_to_the_mean_over_every_volume(ddp_run):
    for validations in zip(*(of_kind(r, "validation") for r in ddp_run["records"])):
        for metric in ("dice", "iou"):
            rows = torch.tensor([row for v in validations for row in v["volumes"][metric]])  # all 3 volumes
            assert rows.shape == (3, 2)
            per_class = torch.nanmean(rows, 0)
            reduced = validations[0]["metrics"]
            assert ([reduced[f"val_{metric}_{c}"] for c in ("organ", "lesion")]
                    == pytest.approx(per_class.tolist(), abs=1e-6))
            assert reduced[f"val_{metric}_mean"] == pytest.approx(float(torch.nanmean(per_class)), abs=1e-6)


@pytest.mark.slow  # the 2-rank run: `make test-slow`
def test_the_loss_falls_and_rank_zero_alone_tracks_prints_and_writes(ddp_run, mlflow_store):
    losses = [e["log"]["train_loss"] for e in of_kind(ddp_run["records"][0], "epoch")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses

    client = mlflow.MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name(ddp_run["experiment"])
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == str(WORLD)
    history = sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)
    assert [m.value for m in history] == pytest.approx(losses)
    best = max(v["metrics"]["val_dice_mean"] for v in of_kind(ddp_run["records"][1], "validation"))
    assert run.data.metrics["best_val_dice_mean"] == pytest.approx(best)

    out = ddp_run["proc"].stdout
    assert out.count("best val dice") == 1 and out.count("DDP over 2 ranks") == 1, out
    assert out.count("val dice") == 3 + 1  # one line per validation and the summary, from rank 0 only
    run_dir = ddp_run["run_dir"]
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"best.pt", "last.pt"}
    assert (run_dir / "splits.json").exists() and (run_dir / "curves.png").exists()
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in last["state_dict"])  # the unwrapped model
    first, second = last["rng"]["ranks"]  # every rank's random streams, for a resume: seeded with seed + rank
    assert not torch.equal(first["torch"], second["torch"])


@pytest.mark.slow  # a second 2-rank run (~25 s); one seed, one result is checked in one process by test_resume.py
def test_one_seed_gives_one_result_for_one_world_size(ddp_run, tiny_phantom, tmp_path):
    again = torchrun(tiny_phantom, tmp_path)
    for r in range(WORLD):
        first, second = (of_kind(run["records"][r], "validation") for run in (ddp_run, again))
        assert ([v["metrics"]["val_dice_mean"] for v in second]
                == pytest.approx([v["metrics"]["val_dice_mean"] for v in first], abs=1e-6))
        first, second = (of_kind(run["records"][r], "epoch") for run in (ddp_run, again))
        assert ([e["log"]["train_loss"] for e in second]
                == pytest.approx([e["log"]["train_loss"] for e in first], abs=1e-6))
    bests = [max(v["metrics"]["val_dice_mean"] for v in of_kind(run["records"][0], "validation"))
             for run in (ddp_run, again)]
    assert bests[1] == pytest.approx(bests[0], abs=1e-6)


@pytest.mark.slow
def test_a_resumed_ddp_run_matches_an_unbroken_one(ddp_run, tiny_phantom, tmp_path, mlflow_store):
    """Two epochs, then a third from last.pt (each rank from its own random state): as the 3-epoch run's third."""
    # The 3-epoch run's cosine schedule (T_max=3), stopped after 2 epochs; then its config says 3 epochs, as if the
    # 3-epoch run had stopped there.
    short = torchrun(tiny_phantom, tmp_path / "short", ["trainer.max_epochs=2", "scheduler.T_max=3"])
    last = tmp_path / "short" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["config"]["trainer"]["max_epochs"] = 3
    torch.save(state, last)
    resumed = torchrun(tiny_phantom, tmp_path / "resumed", resume=last)
    for r in range(WORLD):
        (third,) = of_kind(resumed["records"][r], "epoch")
        unbroken = of_kind(ddp_run["records"][r], "epoch")[2]
        assert third["epoch"] == 3
        for key in ("train_loss", "val_dice_mean", "val_iou_lesion"):
            assert third["log"][key] == pytest.approx(unbroken["log"][key], abs=1e-6), key
    client = mlflow.MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name(short["experiment"]).experiment_id])
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "train_loss")}) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------------
# The reduction and partition helpers in a 2-process gloo group (torch.multiprocessing.spawn), against one process.

def volume(*boxes) -> torch.Tensor:
    """A (1, 1, 10, 10, 10) label map with `value` painted into each box (x0, x1, value)."""
    v = torch.zeros(1, 1, 10, 10, 10, dtype=torch.long)
    for x0, x1, value in boxes:
        v[0, 0, x0:x1, :2, :2] = value
    return v


# (prediction, truth) per volume; the first has no lesion anywhere (a NaN lesion score).
VOLUMES = [
    (volume((0, 4, 1)), volume((0, 4, 1))),
    (volume((0, 2, 1), (6, 8, 2)), volume((0, 4, 1), (6, 8, 2))),
    (volume((1, 5, 1), (6, 7, 2)), volume((0, 4, 1), (6, 9, 2))),
]
NAMES = ["background", "organ", "lesion"]


def _helpers_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        result = {}
        for name, share in (("uneven", [[0, 1], [2]][rank]), ("empty", [[0, 1, 2], []][rank])):
            scores = SegmentationScores(NAMES)
            for i in share:
                scores.update(*VOLUMES[i])
            result[name] = scores.compute(reduce=distributed.all_reduce)
        result["partition"] = distributed.partition(list(range(5)))
        result["partition_even"] = distributed.partition(list(range(5)), even=True)
        result["mean"] = distributed.mean([1.0, 5.0][rank] * [1, 3][rank], [1, 3][rank])  # losses 1 | 5, 5, 5
        result["maximum"] = distributed.maximum([2.0, 7.0][rank])
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # a two-process group: `make test-slow`
def test_reduction_and_partition_helpers_in_a_two_process_group(tmp_path):
    mp.spawn(_helpers_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    alone = SegmentationScores(NAMES)
    for pred, truth in VOLUMES:
        alone.update(pred, truth)
    assert torch.isnan(alone.per_volume()["dice"]).sum() == 1  # the lesion of the first volume: no vote
    expected = alone.compute()
    for rank in ranks:
        for name in ("uneven", "empty"):  # 2 + 1 volumes, and 3 + none: the mean over all three either way
            assert rank[name] == pytest.approx(expected, abs=1e-6), name
    assert ranks[0]["uneven"] == ranks[1]["uneven"]
    assert [r["partition"] for r in ranks] == [[0, 2, 4], [1, 3]]
    assert [r["partition_even"] for r in ranks] == [[0, 2, 4], [1, 3, 0]]  # padded: as many steps on every rank
    assert [r["mean"] for r in ranks] == [4.0, 4.0] and [r["maximum"] for r in ranks] == [7.0, 7.0]


def test_helpers_are_identities_without_a_process_group():
    assert not distributed.active() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.partition([3, 1, 2], even=True) == [3, 1, 2]
    t = torch.tensor([1.0, float("nan")])
    assert distributed.all_reduce(t) is t
    assert distributed.mean(6.0, 4) == 1.5 and distributed.maximum(2.5) == 2.5
    assert distributed.gather({"a": 1}) == [{"a": 1}]
    state = {"python": 1}
    assert distributed.rng_states(state) is state and distributed.own_rng(state) == state
