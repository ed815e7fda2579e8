"""Training entry point: `python -m pipeline.train [key=value ...]` (also `--multirun` for sweeps).

Parses the config and calls pipeline.training.run.train.
"""

from omegaconf import DictConfig

from pipeline.core import logs
from pipeline.core.config import entry_point
from pipeline.training.run import train


@entry_point("train")
def main(cfg: DictConfig) -> float:
    logs.quiet()  # known-harmless third-party lines (pipeline/core/logs.py), in each job's process too
    # The return value is what Hydra sweepers (e.g. Optuna) optimise.
    return train(cfg)["best"]["val_dice_mean"]


if __name__ == "__main__":
    main()
