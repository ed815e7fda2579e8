"""3D medical image segmentation on MONAI, composed with Hydra and tracked with MLflow."""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from omegaconf import OmegaConf

try:
    __version__ = version("pipeline")  # pyproject.toml's, as installed
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"


def project_root() -> Path:
    """The folder holding `conf/` (the repository root for an editable install), else the working directory."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "conf").is_dir() else Path.cwd()


# Configs say `${project_root:}` so outputs, data and the MLflow store resolve to absolute paths from any cwd.
OmegaConf.register_new_resolver("project_root", lambda: str(project_root()), replace=True)


def out_channels(num_classes: int | None, activation: str) -> int | None:
    """Output channels of a network's head: one per class for softmax, one sigmoid channel for binary data."""
    if activation == "softmax" or num_classes is None:
        return num_classes
    if activation == "sigmoid":
        if num_classes != 2:
            raise ValueError(f"activation=sigmoid (loss=bce/bce_tv) is for binary data; "
                             f"data.num_classes is {num_classes}")
        return 1
    raise ValueError(f"activation={activation}: must be softmax or sigmoid")


OmegaConf.register_new_resolver("out_channels", out_channels, replace=True)

from pipeline.core import logs  # noqa: E402, F401  (the console fallback for the `pipeline` loggers)
