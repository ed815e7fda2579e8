"""One training run's folder: every path that training writes and that evaluation, resume and the benchmarks read.

    <run>/checkpoints/best.pt, last.pt    engine.fit
    <run>/splits.json                     train (the case ids of each split; evaluate split= reads it)
    <run>/curves.png, overlays/           train, engine.fit
    <run>/metrics.jsonl                   tracking (every logged metric)
    <run>/.hydra/, train.log              Hydra
"""

from pathlib import Path


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @classmethod
    def of(cls, ckpt: str | Path) -> "RunDir":
        """The run a checkpoint in its checkpoints/ folder belongs to."""
        return cls(Path(ckpt).parent.parent)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def overlays(self) -> Path:
        return self.root / "overlays"

    @staticmethod
    def runs_in(folder: str | Path) -> list["RunDir"]:
        """The runs directly in `folder` that hold a best.pt (a multirun's jobs, e.g. the k folds), by name."""
        runs = [RunDir.of(p) for p in Path(folder).glob("*/checkpoints/best.pt")]
        return sorted(runs, key=lambda run: run.root.name)

    @staticmethod
    def newest_last(runs: str | Path) -> Path | None:
        """The most recently written last.pt of the runs in `runs` (outputs/runs/train), or None."""
        found = sorted(Path(runs).glob("*/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None
