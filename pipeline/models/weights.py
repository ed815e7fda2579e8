"""How a network's weights start: Kaiming initialisation, or tensors copied from a local file (transfer learning)."""

import logging
import re
from pathlib import Path

from monai.networks.utils import copy_model_state
from torch import nn

from pipeline.core.errors import InputError
from pipeline.models import checkpoint

log = logging.getLogger(__name__)

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def kaiming_(model: nn.Module) -> nn.Module:
    """Kaiming-normal weights (fan-out, for ReLU-family activations) for every convolution, zero biases."""
    for m in model.modules():
        if isinstance(m, CONVS):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def load_matching(model: nn.Module, path: str | Path, prefix: str | None = None) -> list[str]:
    """Copy every tensor of `path` (a pipeline checkpoint or a plain state_dict) whose name starts with `prefix` and
    whose name and shape match the model's; the names copied. Loaded with weights_only=True: no code runs."""
    state = checkpoint.read(path, "init.weights file")
    state = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(state, dict):
        raise InputError(f"{path}: holds no state_dict")
    skip = f"^(?!{re.escape(prefix)})" if prefix else None  # MONAI skips the names this pattern finds
    _, copied, _ = copy_model_state(model, state, exclude_vars=skip, inplace=True)
    if not copied:
        raise InputError(f"{path}: no tensor matches the model by name and shape"
                         + (f" under prefix {prefix!r}" if prefix else ""))
    return copied


def initialise(model: nn.Module, init) -> nn.Module:
    """Apply the `init` config: Kaiming first, then copied weights on top (e.g. a pretrained encoder)."""
    if init is None:
        return model
    if init.get("kaiming"):
        kaiming_(model)
    if init.get("weights"):
        copied = load_matching(model, init["weights"], init.get("prefix"))
        log.info(f"init.weights: {len(copied)} of {len(model.state_dict())} tensors copied from {init['weights']}")
    return model
