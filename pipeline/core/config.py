"""Compose configs as the entry points do, from tests, benchmarks, notebooks or inside a running Hydra app."""

import hydra
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from pipeline import project_root


def compose(name: str = "train", overrides=()) -> DictConfig:
    """A config as `python -m pipeline.<name> overrides...` composes it; inside a running Hydra app, from its
    config search path."""
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        return hydra_compose(config_name=name, overrides=list(overrides))


def option(group: str, name: str) -> DictConfig:
    """One option of a config group exactly as `group=name` composes it, e.g. option("transforms/normalize", "ct"),
    from inside a Hydra app (its config search path) or outside one (the project's conf/)."""
    return OmegaConf.select(compose("train", [f"{group}={name}"]), group.replace("/", "."))


def entry_point(config_name: str):
    """`python -m pipeline.<name>`: Hydra composes conf/<config_name>.yaml with the command line's overrides, and
    errors stop it in one line (errors.exit_on_input_error)."""
    from pipeline.core.errors import exit_on_input_error

    def decorate(main):
        return hydra.main(config_path="../conf", config_name=config_name, version_base="1.3")(exit_on_input_error(main))

    return decorate
