"""Build the MONAI transform chains and loaders from the `transforms` and `data` config groups."""

from hydra.utils import instantiate
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose, EnsureTyped
from omegaconf import DictConfig

from pipeline.errors import InputError


def preprocess(cfg: DictConfig) -> list:
    """Load -> orient -> (resample) -> normalize: deterministic, shared by training, validation and inference."""
    t = cfg.transforms
    stages = [instantiate(t.load), instantiate(t.orient)]
    if cfg.data.spacing is not None:  # resample only when the dataset asks for a target spacing
        stages.append(instantiate(t.resample))
    stages.append(instantiate(t.normalize))
    return stages


def train_transforms(cfg: DictConfig) -> Compose:
    """Preprocess, then pad to the patch size, sample patches by label class and augment image and label together."""
    t = cfg.transforms
    rot = t.augment.get("rotate90")
    if rot is not None and len({cfg.data.patch_size[a] for a in rot.spatial_axes}) > 1:
        raise InputError(f"transforms.augment.rotate90: patch size {list(cfg.data.patch_size)} differs on axes "
                         f"{list(rot.spatial_axes)}, so rotated patches could not be batched; set it to null")
    augment = [instantiate(a) for a in t.augment.values() if a is not None]
    return Compose([*preprocess(cfg), instantiate(t.pad), instantiate(t.patch), *augment, EnsureTyped(keys=["image", "label"], track_meta=False)])


def val_transforms(cfg: DictConfig) -> Compose:
    return Compose([*preprocess(cfg), EnsureTyped(keys=["image", "label"], track_meta=False)])


def loaders(cfg: DictConfig, train_cases: list[dict], val_cases: list[dict]) -> tuple[DataLoader, DataLoader]:
    """CacheDataset keeps everything up to the first random transform in memory, so preprocessing runs once."""
    d = cfg.data
    train = CacheDataset(train_cases, train_transforms(cfg), cache_rate=d.cache_rate, num_workers=None, progress=False)
    val = CacheDataset(val_cases, val_transforms(cfg), cache_rate=d.cache_rate, num_workers=None, progress=False)
    return (
        DataLoader(train, batch_size=d.batch_size, shuffle=True, num_workers=d.num_workers, drop_last=len(train) > d.batch_size),
        DataLoader(val, batch_size=1, num_workers=d.num_workers),  # whole volumes differ in shape
    )
