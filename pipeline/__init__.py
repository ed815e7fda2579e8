"""3D medical image segmentation on MONAI, composed with Hydra and tracked with MLflow."""

from pathlib import Path

from omegaconf import OmegaConf


def project_root() -> Path:
    """The folder holding `conf/` (the repository root for an editable install), else the working directory."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "conf").is_dir() else Path.cwd()


# Configs say `${project_root:}` so outputs, data and the MLflow store resolve to absolute paths from any cwd.
OmegaConf.register_new_resolver("project_root", lambda: str(project_root()), replace=True)
