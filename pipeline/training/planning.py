"""nnU-Net-style planning: derive spacing, patch size, batch size and normalization from the dataset fingerprint.

Any config value set to `auto` (what `plan=auto` does) gets a planned one (the functions here return them;
completion.complete writes them); values given explicitly, e.g. on the command line, are kept. MONAI has no planner,
hence this module.
"""

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipeline.core import hardware
from pipeline.core.config import option
from pipeline.core.errors import InputError
from pipeline.data.transforms import augmentation

log = logging.getLogger(__name__)

PLANNED = ("data.spacing", "data.patch_size", "data.batch_size", "transforms.crop", "transforms.normalize",
           "transforms.augment.affine.rotate_range")
ROTATION = 0.26  # radians (15 degrees) of random rotation about each axis the plan rotates about
# nnU-Net's rule: crop to the nonzero box, and z-score over it, where that box holds under 3/4 of the median case
CROP_BELOW = 0.75


# Air in Hounsfield units is -1000: an undeclared image whose median case goes this low is a CT
HOUNSFIELD_AIR = -500


def is_ct(modalities: list[str], fp: dict) -> bool:
    """CT where the dataset says so (MSD's modality, nnU-Net's channel_names), or, where it names no modality (folder
    pairs), where the first channel's values reach down to air in Hounsfield units."""
    if any(m.upper() == "CT" for m in modalities):
        return True
    undeclared = all(m.lower() in ("image", "") for m in modalities)
    return undeclared and fp.get("minimum", [0.0])[0] <= HOUNSFIELD_AIR


def poolings(patch, spacing, exact: bool = True) -> list[list[int]]:
    """Each down-sampling stage's strides, by nnU-Net's rule (get_pool_and_conv_props): an axis halves while it keeps
    MIN_FEATURE_MAP voxels and its spacing is within 2x of the finest of the axes that can still halve (an axis too
    small to halve no longer holds the others back); exact: only while its size is even."""
    size, spacing, strides = [float(n) for n in patch], [float(s) for s in spacing], []
    while True:
        can = [n / 2 >= MIN_FEATURE_MAP for n in size]
        if not any(can):
            return strides
        finest = min(s for s, c in zip(spacing, can) if c)
        pool = [c and s / finest < 2 and (not exact or n % 2 == 0) for n, s, c in zip(size, spacing, can)]
        if not any(pool):
            return strides
        strides.append([2 if p else 1 for p in pool])
        size = [n / st for n, st in zip(size, strides[-1])]
        spacing = [s * st for s, st in zip(spacing, strides[-1])]


def fit_patch(median_shape: np.ndarray, spacing, budget_voxels: int, min_batch: int, divisor: int,
              planned_network: bool) -> np.ndarray:
    """The patch: the median case whole, each side a multiple of its divisor, shrunk (the side largest relative to
    the median case first, as nnU-Net does) until min_batch patches fit the budget. No side goes below its floor:
    the median case's side or 2 * MIN_FEATURE_MAP voxels, whichever is smaller, and for a planned network one
    finest-spacing side of 4 * MIN_FEATURE_MAP (two poolings: DynUNet has at least three stages); an InputError
    where the budget cannot hold even that."""
    def divisors(patch):
        if not planned_network:
            return np.full(len(patch), divisor)
        return np.minimum(divisor, np.prod([[1] * len(patch), *poolings(patch, spacing, exact=False)], axis=0))

    def rounded(patch):  # up to each axis's divisor (a network pools it exactly)
        step = divisors(patch)
        return np.ceil(patch / step).astype(int) * step

    floor = np.minimum(np.ceil(median_shape), 2 * MIN_FEATURE_MAP)
    if planned_network:  # the largest of the finest axes carries the two poolings a three-stage network needs
        fine = np.asarray(spacing) / min(spacing) < 2
        axis = int(np.argmax(np.where(fine, median_shape, -np.inf)))
        floor[axis] = max(floor[axis], 4 * MIN_FEATURE_MAP)
    floor = rounded(floor)
    patch = np.maximum(rounded(np.ceil(median_shape)), floor)  # cover the median case whole
    while patch.prod() * min_batch > budget_voxels:
        step = divisors(patch)
        shrinkable = patch - step >= floor
        if not shrinkable.any():
            raise InputError(f"plan.budget_voxels={budget_voxels} holds no patch: the smallest, {floor.tolist()}, "
                             f"takes {int(floor.prod()) * min_batch} voxels at plan.min_batch={min_batch}; raise "
                             f"the budget or lower min_batch")
        axis = int(np.argmax(np.where(shrinkable, patch / median_shape, -np.inf)))
        patch[axis] -= step[axis]
        patch = rounded(patch)
    return patch


# A 2D network over axial slices where slices are this many times thicker than pixels (nnU-Net's anisotropy
# threshold): through-plane context 10 mm away adds little, and a CPU budget trains many more in-plane samples
# slice by slice (docs/auto.md: the 2D lever). nnU-Net trains both and keeps the better by cross-validation.
TWO_D_FROM = 3.0


def two_d(spacing) -> tuple[int, str]:
    """(2 or 3, why) for plan.dims=auto: 2 where the axial slices (the last axis) are TWO_D_FROM times or more as far
    apart as the in-plane pixels."""
    ratio = spacing[2] / max(spacing[:2])
    if ratio >= TWO_D_FROM and spacing[2] == max(spacing):
        return 2, f"slices {ratio:.1f}x as far apart as pixels (2D from {TWO_D_FROM:g}x)"
    return 3, f"slices {ratio:.1f}x as far apart as pixels (3D below {TWO_D_FROM:g}x)"


# nnU-Net's 3d_lowres rule: a coarser grid where the full-resolution patch covers under a quarter of the median case;
# the spacing grows (the axes over 2x finer than the coarsest first) until the planned patch covers a quarter of it
LOWRES_COVER, LOWRES_STEP = 0.25, 1.03


def plan(fp: dict, modalities: list[str], budget_voxels: int, min_batch: int = 2, divisor: int = 8,
         planned_network: bool = True, dims: int | str = 3, max_batch_3d: int | None = None,
         grid: str = "full") -> dict:
    """The plan for one dataset.

    budget_voxels: patch voxels x batch size per step, the knob for activation memory and step time.
    divisor: patch sides are multiples of it (2 ** number of down-sampling stages of the network); with
    planned_network (the topology planned for the patch) an axis the network pools fewer times, such as 9 slices of
    10 mm, takes that axis's own, smaller divisor.
    dims: 3, 2 (a 2D network over axial slices: patches one slice thick) or auto (two_d's rule).
    max_batch_3d: a cap on a 3D plan's batch (where the budget should buy patch, not batch); a 2D patch cannot grow
    past its slice, so a 2D plan's batch takes the rest of the budget.
    grid: full (the target spacing) or low (nnU-Net's low-resolution grid where the patch covers under LOWRES_COVER
    of the median case; predictions are resampled back to each case's own grid).
    """
    if grid not in ("full", "low"):
        raise InputError(f"plan.grid={grid}: must be full or low")
    spacings = np.array(fp["spacings"])
    target = np.median(spacings, axis=0)
    anisotropic = target.max() / target.min() > 3
    rotate = [ROTATION] * 3
    if anisotropic:  # keep more through-plane resolution (nnU-Net), and rotate in-plane only (about the coarse axis)
        axis = int(target.argmax())
        target[axis] = np.percentile(spacings[:, axis], 10)
        rotate = [ROTATION if a == axis else 0.0 for a in range(3)]
    shapes = np.array(fp["shapes"])
    nonzero = np.array(fp.get("nonzero_shapes", shapes))
    crop = bool(np.median(nonzero.prod(axis=1) / shapes.prod(axis=1)) < CROP_BELOW)
    native = (nonzero if crop else shapes) * spacings  # case extents in mm after cropping
    dims, why = (two_d(target) if dims == "auto" else (int(dims), "plan.dims"))

    def fitted(target):  # the cases' sizes on this grid, the extent one patch may cover, its patch
        shapes = native / target
        extent = np.median(shapes, axis=0)
        if dims == 2:  # one axial slice a patch
            extent[2] = 1
        return shapes, extent, fit_patch(extent, target, budget_voxels, min_batch, divisor, planned_network)

    shapes, extent, patch = fitted(target)
    full = target.copy()
    while grid == "low" and patch.prod() < LOWRES_COVER * extent.prod():
        coarse = target.max() / target > 2  # nnU-Net: the fine axes of anisotropic data first, then every axis
        target = target * np.where(coarse if coarse.any() else True, LOWRES_STEP, 1.0)
        shapes, extent, patch = fitted(target)
    if dims == 2:
        rotate = [0.0, 0.0, ROTATION]  # rotated in-plane
    median_shape = np.median(shapes, axis=0)
    batch = max(min_batch, budget_voxels // int(patch.prod()))
    if dims == 3 and max_batch_3d:
        batch = min(batch, max(max_batch_3d, min_batch))
    # nnU-Net's cap: one step sees at most 5 percent of the dataset's voxels
    batch = int(min(batch, max(min_batch, 0.05 * shapes.prod(axis=1).sum() // patch.prod())))

    if is_ct(modalities, fp):
        i = fp["intensity"][0]  # clip to the foreground's 0.5-99.5 percentiles, then scale
        normalize = {"name": "ct", "a_min": i["p0.5"], "a_max": i["p99.5"]}
    else:  # per case; over the cropped-to box's nonzero voxels where the crop matters (the empty border is no tissue)
        normalize = {"name": "zscore_fg" if crop else "zscore"}
    return {
        # always a target grid, as nnU-Net's: an input on another grid is resampled to it at inference (a case already
        # on it is left as it is: MONAI's Spacing returns its input where the grid does not change)
        "spacing": [round(float(s), 4) for s in target],
        "patch_size": patch.tolist(),
        "batch_size": batch,
        "crop": crop,
        "normalize": normalize,
        "rotate_range": rotate,
        "median_shape": [round(float(n)) for n in median_shape],
        "dims": dims, "dims_why": why,
        "grid": "full grid" if np.allclose(target, full) else f"low grid: {np.prod(target / full):.1f}x fewer voxels",
    }


# Network topology for DynUNet (nnU-Net's get_pool_and_conv_props rule). Width: nnU-Net's 32 pays where the budget
# trains it long enough, else 16 trains more steps in the same minutes: 16 by default; `plan.base_filters=auto` times
# one 32-wide step on this machine and keeps 32 where the budget affords MIN_STEPS of them (docs/auto.md: the width
# lever).
TOPOLOGY = ("kernel_size", "strides", "upsample_kernel_size", "filters")
BASE_FILTERS, FAST_BASE_FILTERS, MAX_FILTERS, MIN_FEATURE_MAP = 16, 32, 320, 4
MIN_STEPS = 1200


def step_seconds(model: torch.nn.Module, shape: tuple, precision: hardware.Precision, device: torch.device) -> float:
    """One training step's seconds (forward and backward in the training precision, channels-last weights as
    training has them), the faster of two after a warm-up."""
    model = hardware.channels_last(model.to(device)).train()
    x, times = torch.randn(shape, device=device), []
    for _ in range(3):
        start = time.perf_counter()
        with hardware.autocast(device, precision.dtype):
            out = model(x)
        out.float().sum().backward()
        if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def auto_width(cfg: DictConfig, network: dict, patch: list[int]) -> tuple[int, str]:
    """(base width, why) for `plan.base_filters=auto`: 32 where trainer.max_minutes trains MIN_STEPS steps of the
    32-wide `network` (the whole model config) on this machine, else 16; without a time budget, 32 where training
    runs in reduced precision on hardware built for it (a GPU, a CPU with native bf16)."""
    device = hardware.pick_device(cfg.trainer.device)
    precision = hardware.resolve(cfg.trainer.amp, device)
    if (minutes := cfg.trainer.get("max_minutes")) is None:
        fast = precision.dtype is not None
        return (FAST_BASE_FILTERS if fast else BASE_FILTERS), f"trains in {precision.name}, no time budget"
    model = instantiate(network)
    batch = cfg.data.batch_size * cfg.transforms.patch.get("num_samples", 1)
    seconds = step_seconds(model, (batch, cfg.data.in_channels, *patch), precision, device)
    steps = 60 * minutes / seconds
    return ((FAST_BASE_FILTERS if steps >= MIN_STEPS else BASE_FILTERS),
            f"{minutes} min hold {steps:.0f} steps of {seconds:.2f} s at 32 wide in {precision.name}; "
            f"32 from {MIN_STEPS}")


def topology(patch: list[int], spacing: list[float], base_filters: int = BASE_FILTERS) -> dict:
    """Per-stage kernels, strides and widths for a patch (nnU-Net's rule): strides as `poolings` halves the axes;
    a kernel is 3 along an axis once its spacing is within
    2x of the finest (1 before: an anisotropic axis is first convolved in-plane only). Widths double per stage from
    base_filters."""
    spacing = list(spacing)

    def kernel(previous):  # 1 along an axis one voxel thick (a 2D patch): a wider kernel would see only padding
        return [3 if (k == 3 or s / min(spacing) < 2) and n > 1 else 1 for k, s, n in zip(previous, spacing, patch)]

    kernels, strides = [kernel([1] * len(patch))], [[1] * len(patch), *poolings(patch, spacing)]
    for stride in strides[1:]:
        spacing = [s * st for s, st in zip(spacing, stride)]
        kernels.append(kernel(kernels[-1]))
    filters = [min(base_filters * 2**i, MAX_FILTERS) for i in range(len(strides))]
    return {"kernel_size": kernels, "strides": strides, "upsample_kernel_size": strides[1:], "filters": filters}


def _is_auto(value) -> bool:
    return value == "auto" or (isinstance(value, DictConfig) and value.get("name") == "auto")


def planned_data(cfg: DictConfig, modalities: list[str], fingerprint: Callable[[], dict]) -> dict:
    """The planned value (dotted key -> value) of every data setting left `auto` (spacing, patch, batch, crop,
    normalization, rotation axes), from the fingerprint of the training cases (asked for only then); {} when none is
    auto."""
    auto = [key for key in PLANNED if _is_auto(OmegaConf.select(cfg, key))]
    if not auto:
        return {}
    settings = cfg.get("plan") or {}
    fp = fingerprint()
    p = plan(fp, modalities, settings.get("budget_voxels", 2**19), settings.get("min_batch", 2),
             planned_network=any(_is_auto(cfg.model.get(key)) for key in TOPOLOGY), dims=settings.get("dims", 3),
             max_batch_3d=settings.get("max_batch_3d"), grid=settings.get("grid", "full"))
    values = {f"data.{key}": p[key] for key in ("spacing", "patch_size", "batch_size") if f"data.{key}" in auto}
    if "plan" in cfg:  # the network's dimensions as decided, for planned_topology and plans.json
        values |= {"plan.dims": p["dims"], "plan.dims_why": p["dims_why"]}
    if p["dims"] == 2 and OmegaConf.select(cfg, "transforms.augment.flip_z") is not None:
        # a one-slice patch has nothing to mirror along z, nor has a slice-by-slice prediction: TTA mirrors in-plane
        values["transforms.augment.flip_z"] = None
    if "transforms.augment.affine.rotate_range" in auto:
        values["transforms.augment.affine.rotate_range"] = p["rotate_range"]
    if "transforms.crop" in auto:
        values["transforms.crop"] = option("transforms/crop", "nonzero") if p["crop"] else None
    if "transforms.normalize" in auto:
        norm = dict(p["normalize"])
        # the option as `transforms/normalize=<name>` selects it, with the planned values (e.g. CT's clip range)
        values["transforms.normalize"] = OmegaConf.merge(option("transforms/normalize", norm.pop("name")), norm)
    final = {key: values.get(key, OmegaConf.select(cfg, key)) for key in PLANNED}
    cropped = f", cropped to the nonzero box {p['median_shape']}" if final["transforms.crop"] is not None else ""
    log.info(f"plan from {fp['num_cases']} training cases (median shape {[round(s) for s in fp['median_shape']]}, "
             f"spacing {fp['median_spacing']}{cropped}): spacing {final['data.spacing'] or 'native'} ({p['grid']}), "
             f"{p['dims']}D ({p['dims_why']}), patch {list(final['data.patch_size'])}, "
             f"batch {final['data.batch_size']}, "
             f"normalize {final['transforms.normalize']._target_.rsplit('.', 1)[-1]}"
             f"{' over nonzero voxels' if final['transforms.normalize'].get('nonzero') else ''}")
    return values


def planned_topology(cfg: DictConfig, fingerprint: Callable[[], dict]) -> dict:
    """The network's kernels, strides and widths (dotted key -> value) where the model config says `auto`, planned
    for the (completed) patch and spacing; {} when none is auto. Where the plan chose 2D (plan.dims), a DynUNet is
    planned over the in-plane axes and applied slice by slice (the whole `model` node is replaced)."""
    if not any(_is_auto(cfg.model.get(key)) for key in TOPOLOGY):
        return {}
    spacing = cfg.data.spacing or fingerprint()["median_spacing"]
    slices = (cfg.get("plan") or {}).get("dims") == 2 and cfg.model.get("spatial_dims", 3) == 3
    dims = 2 if slices else cfg.model.get("spatial_dims", 3)  # a 2D network plans over the first two axes
    patch, spacing = list(cfg.data.patch_size)[:dims], list(spacing)[:dims]

    def planned(net: dict) -> dict:  # the model config's values for a topology: the auto keys, the heads that fit
        values = {key: value for key, value in net.items() if _is_auto(cfg.model.get(key))}
        if "deep_supr_num" in cfg.model:  # DynUNet: 1 <= extra heads < upsampling stages (none on a 2-stage net)
            heads = min(cfg.model.deep_supr_num, len(values.get("strides", cfg.model.strides)) - 2)
            values |= {"deep_supr_num": max(heads, 1), "deep_supervision": cfg.model.deep_supervision and heads > 0}
        return values

    def model(net: dict) -> dict:  # the whole model config for a topology
        values = OmegaConf.to_container(cfg.model, resolve=True) | planned(net)
        if slices:  # models/slicewise.py: the 2D network on every axial slice of the (one-slice) patch
            return {"_target_": "pipeline.models.slicewise.SliceWise", "net": values | {"spatial_dims": 2}}
        return values

    setting = (cfg.get("plan") or {}).get("base_filters", BASE_FILTERS)
    if setting == "auto":
        base, why = auto_width(cfg, model(topology(patch, spacing, FAST_BASE_FILTERS)), list(cfg.data.patch_size))
    else:
        base, why = int(setting), "plan.base_filters"
    net = topology(patch, spacing, base)
    values = planned(net)
    log.info(f"network: {'2D slice by slice, ' if slices else ''}{len(net['strides'])} stages, strides "
             f"{net['strides'][1:]}, kernels {net['kernel_size']}, "
             f"filters {list(values.get('filters', cfg.model.get('filters')))} (width {base}: {why})")
    if slices:
        return {"model": model(net)}
    return {f"model.{key}": value for key, value in values.items()}


def plans(cfg: DictConfig, splits: dict[str, list[dict]], precision: hardware.Precision, fp: dict) -> dict:
    """What the run was planned to be (nnU-Net's plans.json): the training cases' fingerprint `fp` and every decision
    taken from it and from this machine, as plain data; training saves it beside the checkpoints and logs it."""
    c, augment = OmegaConf.to_container(cfg, resolve=True), augmentation(cfg, quiet=True)
    flips = [a.spatial_axis for k, a in augment.items() if k.startswith("flip")]
    return {
        "dataset": {"root": c["data"]["root"], "name": c["data"]["name"], "classes": c["data"]["class_names"],
                    "channels": c["data"]["in_channels"],
                    "cases": {k: len(v) for k, v in splits.items()}, "test_fraction": c["data"]["split"]["test"],
                    "subjects": c["data"]["split"].get("subjects"),
                    "fold": c["data"]["fold"]},
        "fingerprint": {k: fp[k] for k in ("num_cases", "median_shape", "median_spacing", "intensity",
                                           "class_frequency")}
        | {"median_nonzero_shape": np.median(fp["nonzero_shapes"], axis=0).tolist()},
        "preprocessing": {"crop": (c["transforms"].get("crop") or {}).get("_target_"),
                          "spacing": c["data"]["spacing"], "normalize": c["transforms"]["normalize"]},
        "patch_size": c["data"]["patch_size"], "batch_size": c["data"]["batch_size"],
        "network": {k: v for k, v in c["model"].items() if k not in ("in_channels", "out_channels")},
        "augmentation": {"mirror_axes": sorted(flips), "transforms": list(augment)},
        "loss": c["loss"]["_target_"], "optimizer": c["optimizer"], "scheduler": c["scheduler"],
        "budget": {"max_minutes": c["trainer"]["max_minutes"], "max_epochs": c["trainer"]["max_epochs"]},
        "hardware": {"precision": precision.name, "reason": precision.reason, "cpu": hardware.cpu_class()},
    }
