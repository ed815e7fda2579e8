"""Training entry point: `python -m pipeline.train [key=value ...]` (also `--multirun` for sweeps).

Parses the config and calls pipeline.training.train.
"""

import hydra
from omegaconf import DictConfig

from pipeline.errors import exit_on_input_error
from pipeline.training import train


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
@exit_on_input_error
def main(cfg: DictConfig) -> float:
    # The return value is what Hydra sweepers (e.g. Optuna) optimise.
    return train(cfg)["best"]["val_dice_mean"]


if __name__ == "__main__":
    main()
