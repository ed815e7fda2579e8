"""Compose configs outside a Hydra run (tests, benchmarks, notebooks), exactly as the entry points do."""

import os
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from pipeline import project_root


def compose(name: str = "train", overrides=()) -> DictConfig:
    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        return hydra_compose(config_name=name, overrides=list(overrides))


def shared_data() -> Path:
    """The real datasets for tests and benchmarks: $PIPELINE_SHARED_DATA, else ../shared/data beside the project."""
    return Path(os.environ.get("PIPELINE_SHARED_DATA", project_root().parent / "shared" / "data"))
