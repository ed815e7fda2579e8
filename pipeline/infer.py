"""Inference entry point: `python -m pipeline.infer ckpt=best.pt input=<file or folder> output=<folder>`.

Parses the config and calls pipeline.inference.predictor.infer (the library, also used by pipeline.evaluate).
"""

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from pipeline.core import logs
from pipeline.core.config import entry_point
from pipeline.inference.predictor import PredictOptions, infer

log = logging.getLogger(__name__)


@entry_point("infer")
def main(cfg: DictConfig) -> None:
    logs.quiet()  # known-harmless third-party lines (pipeline/core/logs.py)
    report = infer(cfg.ckpt, cfg.input, cfg.output, PredictOptions.from_config(cfg), format=cfg.format,
                   overwrite=cfg.overwrite, save_probabilities=cfg.save_probabilities)
    log.info(f"{len(report['written'])} written, {len(report['skipped'])} skipped (exist; overwrite=true to redo), "
             f"{len(report['failed'])} failed -> {Path(cfg.output).resolve()}")
    if report["failed"]:
        sys.exit(f"error: {len(report['failed'])} of {len(report['written']) + len(report['failed'])} inputs failed: "
                 + ", ".join(str(p) for p in report["failed"]))


if __name__ == "__main__":
    main()
