"""Export entry point: `python -m pipeline.export ckpt=best.pt format=onnx|torchscript|bundle [output=...]`.

Parses the config and calls pipeline.models.export.export.
"""

import logging

from omegaconf import DictConfig

from pipeline.config import entry_point
from pipeline.models.export import export

log = logging.getLogger(__name__)


@entry_point("export")
def main(cfg: DictConfig) -> None:
    log.info(f"wrote {export(cfg.ckpt, cfg.format, cfg.output)}")


if __name__ == "__main__":
    main()
