"""Training entry point: `python -m pipeline.train [key=value ...]` (also `--multirun` for sweeps).

Parses the config and calls pipeline.training.train.
"""

from omegaconf import DictConfig

from pipeline import logs
from pipeline.config import entry_point
from pipeline.training import train


@entry_point("train")
def main(cfg: DictConfig) -> float:
    logs.quiet()  # known-harmless third-party lines (pipeline/logs.py), in each job's process too
    # The return value is what Hydra sweepers (e.g. Optuna) optimise.
    return train(cfg)["best"]["val_dice_mean"]


if __name__ == "__main__":
    main()
