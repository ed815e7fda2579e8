"""Evaluation entry point: score label maps against ground truth, per case and class.

    python -m pipeline.evaluate pred=<folder> truth=<folder or dataset.json>   # predictions already made
    python -m pipeline.evaluate ckpt=<best.pt> split=test   # predict a split of the checkpoint's data first

Parses the config and calls pipeline.evaluation.scoring.evaluate.
"""

from omegaconf import DictConfig

from pipeline.core import logs
from pipeline.core.config import entry_point
from pipeline.evaluation.scoring import evaluate


@entry_point("evaluate")
def main(cfg: DictConfig) -> float:
    logs.quiet()  # known-harmless third-party lines (pipeline/core/logs.py)
    return evaluate(cfg)["mean"]["dice"]


if __name__ == "__main__":
    main()
