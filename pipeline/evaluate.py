"""Evaluation entry point: score label maps against ground truth, per case and class.

    python -m pipeline.evaluate pred=<folder> truth=<folder or dataset.json>   # predictions already made
    python -m pipeline.evaluate ckpt=<best.pt> split=test   # predict a split of the checkpoint's data first

Parses the config and calls pipeline.evaluation.evaluate.
"""

import hydra
from omegaconf import DictConfig

from pipeline.errors import exit_on_input_error
from pipeline.evaluation import evaluate


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
@exit_on_input_error
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["mean"]["dice"]


if __name__ == "__main__":
    main()
