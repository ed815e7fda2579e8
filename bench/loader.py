"""Input pipeline choices, measured: seconds per training epoch for each loader on real hippocampus data.

    .venv/bin/python bench/loader.py [--data ../shared/data/msd_hippocampus] [--epochs 2]

Each setting trains `experiment=hippocampus_quick` (a light network, so the loader's share shows) for a few epochs
(cache filled first, not timed); the median epoch time (training only) is compared against the plain DataLoader in
the main process measured in the same run, and written to docs/results/loader.{md,json}.
"""

import argparse
from pathlib import Path

from pipeline import project_root
from pipeline.core.config import compose
from pipeline.core.rundir import RunDir
from pipeline.data.transforms import loaders
from pipeline.tracking.runs import NullTracker
from pipeline.training import engine
from pipeline.training.run import setup

from common import RESULTS, machine, machine_line, shared_data, write

SETTINGS = {
    "DataLoader, main process": ["data.loader=workers", "data.num_workers=0"],
    "DataLoader, 1 worker": ["data.loader=workers", "data.num_workers=1"],
    "DataLoader, 2 workers": ["data.loader=workers", "data.num_workers=2"],
    "ThreadDataLoader": ["data.loader=thread"],
}


class EpochTimes(NullTracker):
    def __init__(self):
        self.minutes = []

    def log_metrics(self, metrics, step):
        self.minutes.append(metrics["train_minutes"])


def main() -> None:
    default_data = str(shared_data() / "msd_hippocampus")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=default_data)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where loader.md and loader.json go")
    args = parser.parse_args()
    results = {}
    for name, overrides in SETTINGS.items():
        cfg = compose("train", ["experiment=hippocampus_quick", f"data.root={args.data}", "tracking=none",
                                f"trainer.max_epochs={args.epochs}", f"trainer.val_every={args.epochs + 1}",
                                f"paths.run_dir={project_root()}/outputs/bench/loader", *overrides])
        job = setup(cfg)
        job.train_loader, job.val_loader = loaders(cfg, job.splits["train"], job.splits["val"][:1])
        job.tracker, job.run_dir = (times := EpochTimes()), RunDir(cfg.paths.run_dir)
        engine.fit(cfg.trainer, job)
        per_epoch = sorted(60 * (b - a) for a, b in zip([0.0] + times.minutes, times.minutes))
        results[name] = per_epoch[len(per_epoch) // 2]
    base = results["DataLoader, main process"]
    for name, seconds in results.items():
        print(f"{name:26s} {seconds:6.2f} s/epoch  x{base / seconds:.2f} vs main process")
    data = {"machine": machine(), "epochs": args.epochs, "seconds_per_epoch": results}
    page = ["# Input pipeline", "", "Written by `bench/loader.py` (do not edit by hand): the median training epoch of "
            f"`experiment=hippocampus_quick` on the hippocampus training cases ({args.epochs} epochs each, cache "
            "filled first), each loader against the plain DataLoader in the main process, same run.", "",
            machine_line(data["machine"]), "", "| loader | s / epoch | speed vs main process |", "| --- | --- | --- |",
            *(f"| {name} | {seconds:.2f} | x{base / seconds:.2f} |" for name, seconds in results.items())]
    print(f"wrote {write('loader', data, chr(10).join(page), args.results)}")


if __name__ == "__main__":
    main()
