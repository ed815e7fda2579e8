"""Self-contained checkpoints: weights + the resolved config (plain data), so inference needs only the file."""

import os
from pathlib import Path

import torch

from pipeline.errors import InputError


def save(path: str | Path, model: torch.nn.Module, config: dict, **extra) -> Path:
    """Write atomically (temp file + rename): an interrupted save never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = getattr(model, "module", model)  # unwrap DDP / torch.compile wrappers
    module = getattr(module, "_orig_mod", module)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"state_dict": module.state_dict(), "config": config, **extra}, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | Path) -> dict:
    """Load with weights_only=True: a checkpoint cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise InputError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(bundle, dict) or not {"state_dict", "config"} <= bundle.keys():
        raise InputError(f"{path}: not a pipeline checkpoint (no state_dict/config)")
    return bundle
