"""Build the MONAI transform chains, datasets and loaders from the `transforms` and `data` config groups."""

import hashlib
import json
import logging
import os
from pathlib import Path

import nibabel as nib
from hydra.utils import instantiate
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset, ThreadDataLoader
from monai.transforms import Compose, EnsureTyped
from omegaconf import DictConfig, OmegaConf

from pipeline.core import distributed
from pipeline.core.errors import InputError
from pipeline.core.files import StorageError, free_bytes, megabytes

log = logging.getLogger(__name__)

KEYS = ["image", "label"]
PREPROCESSING = ("load", "orient", "crop", "resample", "normalize")


def nonzero(x):
    """The voxels transforms.crop=nonzero keeps the bounding box of: nonzero in any channel (z-scored data is negative
    inside the body, so MONAI's default `x > 0` would cut into it)."""
    return x != 0


def preprocessing_config(cfg) -> dict:
    """The settings that decide preprocessing, as plain data (a config or a checkpoint's dict): what a disk cache is
    keyed by and what ensemble members must share. A stage absent from an older checkpoint is None (not run)."""
    stages = {k: cfg["transforms"].get(k) for k in PREPROCESSING} | {"spacing": cfg["data"]["spacing"]}
    # resolved in place: a node's interpolations (${data.spacing}) refer to the whole config, which a copy lacks
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in stages.items()}


def preprocessing_stages(cfg) -> list[str]:
    """The stages that run (a config or a checkpoint's dict): crop only when set, resample only when the dataset asks
    for a spacing."""
    return [s for s in PREPROCESSING if (cfg["transforms"].get(s) is not None
                                         and (s != "resample" or cfg["data"]["spacing"] is not None))]


def preprocess(cfg: DictConfig) -> list:
    """Load -> orient -> (crop) -> (resample) -> normalize: deterministic, shared by training, validation and
    inference."""
    return [instantiate(cfg.transforms[s]) for s in preprocessing_stages(cfg)]


def augmentation(cfg: DictConfig, quiet: bool = False) -> dict:
    """The augment transforms that run (name -> config): those set, less RandRotate90d where the patch is not square
    on its axes (rotated patches would change shape and could not be batched; planned patches are rarely square)."""
    augment = {name: a for name, a in cfg.transforms.augment.items() if a is not None}
    rot = augment.get("rotate90")
    if rot is not None and len({cfg.data.patch_size[a] for a in rot.spatial_axes}) > 1:
        if not quiet:
            log.info(f"transforms.augment.rotate90 skipped: patch {list(cfg.data.patch_size)} "
                     f"is not square on axes {list(rot.spatial_axes)}")
        del augment["rotate90"]
    return augment


def train_transforms(cfg: DictConfig) -> Compose:
    """Preprocess, then pad to the patch size, sample patches by label class and augment image and label together.

    Metadata tracking stops after preprocessing: the random transforms run on plain tensors, which is faster.
    """
    t = cfg.transforms
    augment = [instantiate(a) for a in augmentation(cfg).values()]
    return Compose([*preprocess(cfg), EnsureTyped(keys=KEYS, track_meta=False), instantiate(t.pad),
                    instantiate(t.patch), *augment])


def val_transforms(cfg: DictConfig) -> Compose:
    return Compose([*preprocess(cfg), EnsureTyped(keys=KEYS, track_meta=False)])


def cache_mode(cfg: DictConfig, cases: list[dict]) -> str:
    """Where preprocessed cases are kept. In memory only within the RAM budget (data.cache_ram_gb, default a
    quarter of RAM): a larger estimate falls back to disk rather than have the OS kill the run. Under DDP the ranks
    on one machine share its budget, each for its own `cases`."""
    mode = cfg.data.cache
    if mode not in ("auto", "memory"):
        return mode
    need = cache_bytes(cfg, cases)
    budget = cfg.data.get("cache_ram_gb") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4 / 2**30
    budget /= distributed.local_world_size()
    if need <= budget * 2**30:
        log.info(f"data.cache: {len(cases)} preprocessed cases in memory, at most {need / 2**30:.2f} GiB "
                 f"(budget {budget:.1f} GiB, a quarter of RAM unless data.cache_ram_gb)")
        return "memory"
    log.info(f"data.cache: the cache needs about {need / 2**30:.2f} GiB, "
             f"over the {budget:.2f} GiB RAM budget; caching on disk")
    return "disk"


def cache_bytes(cfg: DictConfig, cases: list[dict]) -> int:
    """About what the preprocessed cases take: float32 image channels + label, from the headers only (no voxel data
    is read)."""
    return sum(4 * (cfg.data.in_channels + 1) * _voxels(c["image"]) for c in cases)


def _voxels(path: str) -> int:
    shape = nib.load(path).header.get_data_shape()
    return int(shape[0] * shape[1] * shape[2])


def dataset(cfg: DictConfig, cases: list[dict], transform: Compose, mode: str):
    """Deterministic transforms run once (memory or disk cache); the random ones after the cache, every epoch."""
    if mode == "memory":
        return CacheDataset(cases, transform, num_workers=None, progress=False)
    if mode == "disk":
        # The cache folder is keyed by the preprocessing config, so a changed pipeline never reads stale tensors.
        key = hashlib.sha1(json.dumps(preprocessing_config(cfg), sort_keys=True).encode()).hexdigest()[:16]
        folder = Path(cfg.paths.outputs) / "cache" / key
        # MONAI fills the cache inside the loader's workers, where a full disk surfaces as a worker traceback: check
        # the room first (cases already cached need none).
        filled = folder.is_dir() and any(folder.iterdir())  # an earlier run's cache needs no more room
        if not filled and free_bytes(folder) < (need := cache_bytes(cfg, cases)):
            raise StorageError.at(folder, f"the disk cache needs about {megabytes(need)} (set data.cache=none, or "
                                          "paths.outputs= on another disk)")
        return PersistentDataset(cases, transform, cache_dir=folder)
    if mode == "none":
        return Dataset(cases, transform)
    raise InputError(f"data.cache={mode}: must be auto, memory, disk or none")


def loaders(cfg: DictConfig, train_cases: list[dict], val_cases: list[dict]):
    """Training (shuffled, augmented patches) and validation (whole volumes) loaders. Under DDP each rank loads and
    caches only its share of the cases: as many training cases on every rank, the validation cases as they fall."""
    d = cfg.data
    train_cases = distributed.partition(train_cases, even=True)  # DDP steps every rank in lockstep
    val_cases = distributed.partition(val_cases)  # the scores are summed over ranks: uneven shares are fine
    mode = cache_mode(cfg, train_cases + val_cases)
    train = dataset(cfg, train_cases, train_transforms(cfg), mode)
    val = dataset(cfg, val_cases, val_transforms(cfg), mode)
    drop_last = len(train_cases) > d.batch_size
    if d.loader == "thread":  # augmentation in a thread overlaps the (GIL-releasing) model step
        train_loader = ThreadDataLoader(train, batch_size=d.batch_size, shuffle=True, drop_last=drop_last,
                                        num_workers=0)
    else:
        train_loader = DataLoader(train, batch_size=d.batch_size, shuffle=True, drop_last=drop_last,
                                  num_workers=d.num_workers)
    return train_loader, DataLoader(val, batch_size=1, num_workers=0)  # whole volumes differ in shape
