"""Export entry point: `python -m pipeline.export ckpt=best.pt format=onnx|torchscript|bundle [output=...]`.

The exported file runs without this package (ONNX Runtime, or `torch.jit.load`); a `<name>.json` beside it holds the
resolved training config (preprocessing, classes, window size) needed to feed it the same inputs. A bundle is the
folder MONAI's own tools read (pipeline/models/bundle.py).
"""

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from pipeline.core.config import entry_point
from pipeline.core.files import atomic
from pipeline.models import checkpoint
from pipeline.models.bundle import export_bundle
from pipeline.models.export import SUFFIX, build_model, export_model

log = logging.getLogger(__name__)


def export(ckpt: str | Path, fmt: str, output: str | Path | None = None) -> Path:
    """The checkpoint's network as ONNX or TorchScript (+ its config as JSON beside it), or as a MONAI bundle folder
    (format=bundle, default <ckpt>_bundle/ beside it: pipeline/models/bundle.py)."""
    bundle = checkpoint.load(ckpt)
    if fmt == "bundle":
        folder = Path(output) if output else Path(ckpt).with_name(f"{Path(ckpt).stem}_bundle")
        return export_bundle(build_model(bundle), bundle["state_dict"], bundle["config"], folder)
    path = Path(output) if output else Path(ckpt).with_suffix(SUFFIX.get(fmt, ""))
    export_model(build_model(bundle), bundle["config"], fmt, path)
    with atomic(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(bundle["config"], indent=1))
    return path



@entry_point("export")
def main(cfg: DictConfig) -> None:
    log.info(f"wrote {export(cfg.ckpt, cfg.format, cfg.output)}")


if __name__ == "__main__":
    main()
