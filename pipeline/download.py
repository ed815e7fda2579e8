"""Download entry point: `make data task=Task04_Hippocampus` (any MSD task; or url=... md5=... for another archive).

Parses the config, calls pipeline.data.download.fetch, then checks the dataset as training would (pipeline.check).
"""

import sys

from omegaconf import DictConfig

from pipeline.core.config import compose, entry_point
from pipeline.data.checks import check, log_report
from pipeline.data.download import fetch


@entry_point("download")
def main(cfg: DictConfig) -> None:
    root = fetch(cfg.task, cfg.root, cfg.url, cfg.md5)
    if cfg.check:
        report = check(compose("train", ["data=msd", f"data.root={root}"]), progress=True)
        log_report(root, report, then=f"; train with: make train data=msd data.root={root}")
        if report["faults"]:
            sys.exit(1)


if __name__ == "__main__":
    main()
