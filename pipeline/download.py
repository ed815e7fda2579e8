"""Download entry point: `make data task=Task04_Hippocampus` (any MSD task; or url=... md5=... for another archive).

Parses the config, calls pipeline.data.download.fetch, then checks the dataset as training would (pipeline.check).
"""

import sys

import hydra
from omegaconf import DictConfig

from pipeline.config import compose
from pipeline.data.checks import check, log_report
from pipeline.data.download import fetch
from pipeline.errors import exit_on_input_error


@hydra.main(config_path="../conf", config_name="download", version_base="1.3")
@exit_on_input_error
def main(cfg: DictConfig) -> None:
    root = fetch(cfg.task, cfg.root, cfg.url, cfg.md5)
    if cfg.check:
        report = check(compose("train", ["data=msd", f"data.root={root}"]), progress=True)
        log_report(root, report, then=f"; train with: make train data=msd data.root={root}")
        if report["faults"]:
            sys.exit(1)


if __name__ == "__main__":
    main()
