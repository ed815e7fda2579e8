"""Training entry point: `python -m pipeline.train [key=value ...]` (also `--multirun` for sweeps).

Parses the config and calls pipeline.training.train.
"""

from omegaconf import DictConfig

from pipeline.config import entry_point
from pipeline.training import train


@entry_point("train")
def main(cfg: DictConfig) -> float:
    # The return value is what Hydra sweepers (e.g. Optuna) optimise.
    return train(cfg)["best"]["val_dice_mean"]


if __name__ == "__main__":
    main()
