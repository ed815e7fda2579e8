"""Export entry point: `python -m pipeline.export ckpt=best.pt format=onnx|torchscript [output=...]`.

Parses the config and calls pipeline.models.export.export.
"""

import logging

import hydra
from omegaconf import DictConfig

from pipeline.errors import exit_on_input_error
from pipeline.models.export import export

log = logging.getLogger(__name__)


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
@exit_on_input_error
def main(cfg: DictConfig) -> None:
    log.info(f"wrote {export(cfg.ckpt, cfg.format, cfg.output)}")


if __name__ == "__main__":
    main()
