"""Self-contained checkpoints: weights + the resolved config (plain data), so inference needs only the file."""

import random
from pathlib import Path

import numpy as np
import torch

from pipeline.core.errors import InputError, first_line
from pipeline.core.files import atomic


def save(path: str | Path, model: torch.nn.Module, config: dict, **extra) -> Path:
    """Write atomically (temp file + rename): an interrupted or refused save (files.StorageError) never leaves a
    half-written checkpoint."""
    module = getattr(model, "module", model)  # unwrap DDP / torch.compile wrappers
    module = getattr(module, "_orig_mod", module)
    # Through a file object: a full disk is then an OSError (ENOSPC), not torch's "unexpected pos" RuntimeError.
    with atomic(path) as tmp, open(tmp, "wb") as f:
        torch.save({"state_dict": module.state_dict(), "config": config, **extra}, f)
    return Path(path)


def read(path: str | Path, what: str = "checkpoint"):
    """torch.load with weights_only=True (a file cannot run code); a missing or unreadable file is an InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise InputError(f"{path}: not a readable {what}: {unreadable(path, err)}") from None


def unreadable(path: Path, err: Exception) -> str:
    """What is wrong with a file torch.load refused, in a few words."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    if "unsupported global" in str(err).lower():  # weights_only=True met a class or function: code it would run
        return "it holds Python objects that could run code, which weights_only=True refuses to load"
    if "Weights only load failed" in str(err):
        return "not a PyTorch checkpoint (its pickle data does not parse)"
    if "central directory" in str(err) or isinstance(err, EOFError):
        return f"truncated or corrupt ({size} bytes; an interrupted copy or a full disk?)"
    return f"{type(err).__name__}: {first_line(err)}"


def load(path: str | Path) -> dict:
    """A pipeline checkpoint: weights and the resolved config."""
    bundle = read(path)
    if not isinstance(bundle, dict) or not {"state_dict", "config"} <= bundle.keys():
        raise InputError(f"{path}: not a pipeline checkpoint (no state_dict/config)")
    return bundle


def _randomizable(transform) -> list:
    """Every MONAI transform with its own random state in a (nested) Compose, in a stable order."""
    from monai.transforms import Compose, Randomizable

    flat = transform.flatten().transforms if isinstance(transform, Compose) else [transform]
    return [t for t in flat if isinstance(t, Randomizable)]


def _numpy_state(state) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), pos, has_gauss, cached]  # plain data: loadable with weights_only=True


def _from_numpy_state(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached


def rng_state(transform=None) -> dict:
    """python, numpy, torch and MONAI transform random states, as plain data."""
    return {
        "python": random.getstate(),
        "numpy": _numpy_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "transforms": ([_numpy_state(t.R.get_state()) for t in _randomizable(transform)]
                       if transform is not None else []),
    }


def restore_rng(state: dict, transform=None) -> None:
    random.setstate(state["python"])
    np.random.set_state(_from_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if transform is not None:
        for t, s in zip(_randomizable(transform), state["transforms"], strict=True):
            t.R.set_state(_from_numpy_state(s))
