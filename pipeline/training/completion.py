"""The gate between a composed config and everything built from it: `complete` fills what the config leaves to the
data, the plan and the training cases, and nothing else writes to a config.

Hydra composes what the user chose; some values can only be known from the data: the classes and channels
(`data.num_classes: ???`, which `out_channels` and every model interpolate), the planned patch, spacing, batch,
normalization and network topology (`auto`), the loss's inverse-frequency class weights. Instantiating a model before
`complete` fails on the missing `data.in_channels` instead of building a wrong network.
"""

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.core.errors import InputError
from pipeline.data.fingerprint import fingerprint
from pipeline.data.sources import Dataset, data_facts, ensure_demo_data, read_dataset, test_fraction
from pipeline.data.subjects import split_dataset
from pipeline.training.losses import inverse_frequency_weights
from pipeline.training.planning import planned_data, planned_topology

log = logging.getLogger(__name__)


@dataclass
class Completed:
    dataset: Dataset
    splits: dict[str, list[dict]]  # train / val / test cases
    fingerprint: Callable[[], dict]  # the training cases' fingerprint, computed at its first call (cached on disk)


def fill(cfg: DictConfig, values: dict) -> None:
    """Write dotted key -> value into cfg, replacing whole nodes (the only writes to a composed config)."""
    with open_dict(cfg):
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)


def complete(cfg: DictConfig, dataset: Dataset | None = None) -> Completed:
    """Read the dataset (generating the demo one if it is missing) unless the check read it already (`dataset`),
    split it, and fill the config in order: data facts, planned data settings, planned network topology, derived loss
    weights, all from one fingerprint of the training cases."""
    if dataset is None:
        ensure_demo_data(cfg.data)
        dataset = read_dataset(cfg.data)
    fill(cfg, {f"data.{key}": value for key, value in data_facts(cfg.data, dataset).items()})
    if cfg.get("activation") == "sigmoid" and cfg.data.num_classes != 2:
        raise InputError(f"{cfg.data.root}: activation=sigmoid (loss=bce, bce_tv) needs binary labels; "
                         f"this dataset has {cfg.data.num_classes} classes (use a softmax loss such as loss=dicece)")
    s = cfg.data.split
    fill(cfg, {"data.split.test": test_fraction(s.test, len(dataset.cases))})  # `auto`: by the dataset's size
    splits, grouped = split_dataset(cfg.data, dataset)
    fill(cfg, {"data.split.subjects": grouped})  # how the cases were grouped, for the plan and the checkpoint
    log.info(f"split: {grouped}; {len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} "
             f"test")
    fp = functools.cache(functools.partial(fingerprint, splits["train"], Path(cfg.paths.outputs) / "fingerprints"))
    fill(cfg, planned_data(cfg, dataset.modalities, fp))
    fill(cfg, planned_topology(cfg, fp))  # after the data plan: it depends on the patch and spacing
    if cfg.loss.get("weight") == "inverse_frequency":  # loss=ce_weighted: class weights from the training cases
        frequencies = list(fp()["class_frequency"])
        frequencies += [0.0] * (cfg.data.num_classes - len(frequencies))  # classes absent from every training label
        fill(cfg, {"loss.weight": inverse_frequency_weights(frequencies)})
        log.info(f"loss.weight (inverse class frequency of the training voxels): "
                 f"{[round(w, 3) for w in cfg.loss.weight]}")
    return Completed(dataset, splits, fp)
