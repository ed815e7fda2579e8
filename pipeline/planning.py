"""nnU-Net-style planning: derive spacing, patch size, batch size and normalization from the dataset fingerprint.

Any config value set to `auto` (what `plan=auto` does) gets a planned one (the functions here return them;
pipeline.completion.complete writes them); values given explicitly, e.g. on the command line, are kept. MONAI has no
planner, hence this module.
"""

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.config import option
from pipeline.data.fingerprint import fingerprint

log = logging.getLogger(__name__)

PLANNED = ("data.spacing", "data.patch_size", "data.batch_size", "transforms.normalize")


def plan(fp: dict, modalities: list[str], budget_voxels: int, min_batch: int = 2, divisor: int = 8) -> dict:
    """The plan for one dataset.

    budget_voxels: patch voxels x batch size per step, the knob for activation memory and step time.
    divisor: patch sides are multiples of it (2 ** number of down-sampling stages of the network).
    """
    spacings = np.array(fp["spacings"])
    target = np.median(spacings, axis=0)
    if target.max() / target.min() > 3:  # strongly anisotropic: keep more through-plane resolution (nnU-Net)
        axis = int(target.argmax())
        target[axis] = np.percentile(spacings[:, axis], 10)
    shapes = np.array(fp["shapes"]) * spacings / target  # case sizes after resampling
    median_shape = np.median(shapes, axis=0)

    patch = np.ceil(median_shape / divisor).astype(int) * divisor  # cover the median case whole
    while patch.prod() * min_batch > budget_voxels and patch.max() > divisor:
        # shrink the side that is largest relative to the median case, as nnU-Net does
        axis = int(np.argmax(patch / median_shape))
        patch[axis] -= divisor
    batch = max(min_batch, budget_voxels // int(patch.prod()))
    # nnU-Net's cap: one step sees at most 5 percent of the dataset's voxels
    batch = int(min(batch, max(min_batch, 0.05 * shapes.prod(axis=1).sum() // patch.prod())))

    if any(m.upper() == "CT" for m in modalities):
        i = fp["intensity"][0]  # clip to the foreground's 0.5-99.5 percentiles, then scale
        normalize = {"name": "ct", "a_min": i["p0.5"], "a_max": i["p99.5"]}
    else:
        normalize = {"name": "zscore"}
    same_grid = np.allclose(spacings, target, atol=1e-3)
    return {
        "spacing": None if same_grid else [round(float(s), 4) for s in target],  # no resampling when all match
        "patch_size": patch.tolist(),
        "batch_size": batch,
        "normalize": normalize,
    }


# Network topology for DynUNet (nnU-Net's get_pool_and_conv_props rule). Base width 16 by default, not nnU-Net's 32:
# on a 2-core AVX2 CPU in fp32 a 32-wide network trains 3.8x slower a step, which costs more Dice in a time budget;
# where bf16 is fast (AMX) an epoch costs 2.6x and 32 wins (`plan.base_filters=32`, experiment=hippocampus_wide;
# figures in docs/hippocampus.md).
TOPOLOGY = ("kernel_size", "strides", "upsample_kernel_size", "filters")
BASE_FILTERS, MAX_FILTERS, MIN_FEATURE_MAP = 16, 320, 4


def topology(patch: list[int], spacing: list[float], base_filters: int = BASE_FILTERS) -> dict:
    """Per-stage kernels, strides and widths for a patch (nnU-Net's rule): halve an axis while it stays even, at least
    MIN_FEATURE_MAP voxels and within 2x of the finest spacing; a kernel is 3 along an axis once its spacing is within
    2x of the finest (1 before: an anisotropic axis is first convolved in-plane only). Widths double per stage from
    base_filters."""
    size, spacing = list(patch), list(spacing)

    def kernel(previous):
        return [3 if k == 3 or s / min(spacing) < 2 else 1 for k, s in zip(previous, spacing)]

    kernels, strides = [kernel([1] * len(size))], [[1] * len(size)]
    while True:
        pool = [n % 2 == 0 and n // 2 >= MIN_FEATURE_MAP and s / min(spacing) < 2 for n, s in zip(size, spacing)]
        if not any(pool):
            break
        stride = [2 if p else 1 for p in pool]
        size = [n // st for n, st in zip(size, stride)]
        spacing = [s * st for s, st in zip(spacing, stride)]
        strides.append(stride)
        kernels.append(kernel(kernels[-1]))
    filters = [min(base_filters * 2**i, MAX_FILTERS) for i in range(len(strides))]
    return {"kernel_size": kernels, "strides": strides, "upsample_kernel_size": strides[1:], "filters": filters}


def _is_auto(value) -> bool:
    return value == "auto" or (isinstance(value, DictConfig) and value.get("name") == "auto")


def planned_data(cfg: DictConfig, modalities: list[str], train_cases: list[dict]) -> dict:
    """The planned value (dotted key -> value) of every data setting left `auto` (spacing, patch, batch,
    normalization), from the fingerprint of the training cases; {} when none is auto."""
    auto = [key for key in PLANNED if _is_auto(OmegaConf.select(cfg, key))]
    if not auto:
        return {}
    settings = cfg.get("plan") or {}
    fp = fingerprint(train_cases, Path(cfg.paths.outputs) / "fingerprints")
    p = plan(fp, modalities, settings.get("budget_voxels", 2**19), settings.get("min_batch", 2))
    values = {f"data.{key}": p[key] for key in ("spacing", "patch_size", "batch_size") if f"data.{key}" in auto}
    if "transforms.normalize" in auto:
        norm = dict(p["normalize"])
        # the option as `transforms/normalize=<name>` selects it, with the planned values (e.g. CT's clip range)
        values["transforms.normalize"] = OmegaConf.merge(option("transforms/normalize", norm.pop("name")), norm)
    final = {key: values.get(key, OmegaConf.select(cfg, key)) for key in PLANNED}
    log.info(f"plan from {fp['num_cases']} training cases (median shape {[round(s) for s in fp['median_shape']]}, "
             f"spacing {fp['median_spacing']}): spacing {final['data.spacing'] or 'native'}, "
             f"patch {list(final['data.patch_size'])}, batch {final['data.batch_size']}, "
             f"normalize {final['transforms.normalize']._target_.rsplit('.', 1)[-1]}")
    return values


def planned_topology(cfg: DictConfig, train_cases: list[dict]) -> dict:
    """The network's kernels, strides and widths (dotted key -> value) where the model config says `auto`, planned
    for the (completed) patch and spacing; {} when none is auto."""
    if not any(_is_auto(cfg.model.get(key)) for key in TOPOLOGY):
        return {}
    spacing = cfg.data.spacing or fingerprint(train_cases, Path(cfg.paths.outputs) / "fingerprints")["median_spacing"]
    dims = cfg.model.get("spatial_dims", 3)  # a 2D network plans over the first two axes
    base = (cfg.get("plan") or {}).get("base_filters", BASE_FILTERS)
    net = topology(list(cfg.data.patch_size)[:dims], list(spacing)[:dims], base)
    values = {f"model.{key}": net[key] for key in TOPOLOGY if _is_auto(cfg.model.get(key))}
    if "deep_supr_num" in cfg.model:  # DynUNet: 1 <= extra heads < upsampling stages (none on a 2-stage net)
        heads = min(cfg.model.deep_supr_num, len(values.get("model.strides", cfg.model.strides)) - 2)
        values |= {"model.deep_supr_num": max(heads, 1),
                   "model.deep_supervision": cfg.model.deep_supervision and heads > 0}
    filters = values.get("model.filters", cfg.model.get("filters"))
    log.info(f"network: {len(net['strides'])} stages, strides {net['strides'][1:]}, kernels {net['kernel_size']}, "
             f"filters {list(filters)}")
    return values
