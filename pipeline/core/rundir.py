"""One training run's folder: every path that training writes and that evaluation, resume and the benchmarks read.

    <run>/checkpoints/best.pt, last.pt    engine.fit
    <run>/splits.json                     train (the case ids of each split; evaluate split= reads it)
    <run>/plans.json                      train (the fingerprint and every planned setting, as nnU-Net's plans.json)
    <run>/curves.png, overlays/           train, engine.fit
    <run>/metrics.jsonl                   tracking (every logged metric)
    <run>/.hydra/, train.log              Hydra
"""

import json
from pathlib import Path

from pipeline.core.errors import InputError


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.best, self.last = self.checkpoints / "best.pt", self.checkpoints / "last.pt"
        self.splits, self.curves = self.root / "splits.json", self.root / "curves.png"
        self.plans = self.root / "plans.json"
        self.overlays = self.root / "overlays"

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def last_good(self) -> Path | None:
        """The checkpoint a failed run can go on from: last.pt, else best.pt (written atomically: whole or absent)."""
        return next((p for p in (self.last, self.best) if p.is_file()), None)

    def model(self, final: bool = False) -> Path:
        """The checkpoint that stands for this run: best.pt, or last.pt where the run validated on cases it also trained
        on (`data.fold=all`, nnU-Net's final model), since there best.pt was picked on cases the network had learned.
        `final`: last.pt always (split=cv scores each fold's final model on the cases its best.pt was picked on)."""
        if final:
            return self.last
        splits = self.recorded_splits()
        return self.last if set(splits.get("val", [])) & set(splits.get("train", [])) else self.best

    def recorded_splits(self) -> dict[str, list[str]]:
        """The case ids of each split as training recorded them in splits.json ({} where the run has none)."""
        if not self.splits.is_file():
            return {}
        try:
            return json.loads(self.splits.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{self.splits}: not a splits.json ({type(err).__name__}: {err})") from None

    @classmethod
    def of(cls, ckpt: str | Path) -> "RunDir":
        """The run a checkpoint in its checkpoints/ folder belongs to."""
        return cls(Path(ckpt).parent.parent)

    @staticmethod
    def runs_in(folder: str | Path) -> list["RunDir"]:
        """The runs directly in `folder` that hold a best.pt (a multirun's jobs, e.g. the k folds), by name."""
        runs = [RunDir.of(p) for p in Path(folder).glob("*/checkpoints/best.pt")]
        return sorted(runs, key=lambda run: run.root.name)

    @staticmethod
    def lasts(runs: str | Path) -> list[Path]:
        """The last.pt files of the runs in `runs` (outputs/runs/train), the most recently written first."""
        return sorted(Path(runs).glob("*/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
