"""Fingerprint caching, nnU-Net-style planning, and a short planned training on real hippocampus MRI."""

import json
import os

import mlflow
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from monai.networks.nets import DynUNet

from pipeline.core.errors import InputError
from pipeline.core.rundir import RunDir
from pipeline.data import checks, sources
from pipeline.data import fingerprint as fp_module
from pipeline.data.fingerprint import fingerprint
from pipeline.data.sources import read_msd
from pipeline.models.adapters import training_outputs as outputs
from pipeline.training import completion, planning
from pipeline.training.completion import complete
from pipeline.training.planning import plan, topology
from pipeline.training.run import save_plans, setup, train
from tests.conftest import compose_config, hippocampus_subset, shared_subset, tiny_config


def test_fingerprint_is_cached_and_invalidated_when_a_file_changes(tiny_phantom, tmp_path, monkeypatch):
    cases = read_msd(tiny_phantom).cases[:3]
    calls = []
    measure = fp_module.measure_case
    monkeypatch.setattr(fp_module, "measure_case", lambda case, rng: calls.append(case) or measure(case, rng))
    first = fingerprint(cases, tmp_path)
    assert len(calls) == 3
    assert fingerprint(cases, tmp_path) == first and len(calls) == 3  # cache hit: nothing measured again
    st = os.stat(cases[1]["label"])
    os.utime(cases[1]["label"], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched
    fingerprint(cases, tmp_path)
    assert len(calls) == 6


def test_fingerprint_reports_ras_geometry_and_foreground_statistics(tiny_phantom, tmp_path):
    fp = fingerprint(read_msd(tiny_phantom).cases, tmp_path)
    assert fp["num_cases"] == 8
    assert fp["median_spacing"] == [1.0, 1.0, 2.5]
    assert (len(fp["class_frequency"]) == 3
            and fp["class_frequency"][0] > fp["class_frequency"][1] > fp["class_frequency"][2])
    i = fp["intensity"][0]
    assert 60 < i["p50"] < 180 and i["p0.5"] < i["p50"] < i["p99.5"]  # organ ~160, lesions ~75, under bias and noise


def fake_fingerprint(shapes, spacings):
    return {"shapes": shapes, "spacings": spacings, "intensity": [{"p0.5": -100.0, "p99.5": 300.0}]}


def test_plan_covers_the_median_case_within_the_budget():
    fp = fake_fingerprint([[36, 50, 35]] * 200, [[1.0, 1.0, 1.0]] * 200)
    p = plan(fp, ["MRI"], budget_voxels=2**19)
    assert p["patch_size"] == [40, 56, 40]  # the median case rounded up to multiples of 8
    assert p["batch_size"] == 2**19 // (40 * 56 * 40)  # 5: the budget, under the 5% cap (200 * 63000 * .05 / 89600 = 7)
    assert p["spacing"] == [1.0, 1.0, 1.0] and p["normalize"] == {"name": "zscore"}  # inference resamples to it


def test_plan_shrinks_the_relatively_largest_side_and_resamples_anisotropic_data():
    spacings = [[0.8, 0.8, 3.0]] * 9 + [[0.7, 0.7, 5.0]]
    fp = fake_fingerprint([[512, 512, 100]] * 10, spacings)
    p = plan(fp, ["CT"], budget_voxels=2 * 64**3)
    assert p["spacing"] == [0.8, 0.8, 3.0]  # median; the 10th percentile of the coarse axis is 3.0 too
    # 3-mm slices under 0.8-mm pixels are pooled twice (4x): that side is a multiple of 4, the others of 8
    assert p["patch_size"] == [112, 112, 20] and np.prod(p["patch_size"]) * 2 <= 2 * 64**3
    strides = np.prod(topology(p["patch_size"], p["spacing"])["strides"], axis=0)
    assert (np.array(p["patch_size"]) % strides == 0).all() and strides.tolist() == [16, 16, 4]
    assert p["batch_size"] >= 2
    assert p["normalize"] == {"name": "ct", "a_min": -100.0, "a_max": 300.0}


def test_network_topology_follows_nnunets_rule():
    # hippocampus: 40 -> 20 -> 10 -> 5 and 56 -> 28 -> 14 -> 7 (odd: no further halving), isotropic: 3x3x3 throughout
    iso = topology([40, 56, 40], [1.0, 1.0, 1.0])
    assert (iso["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
            and iso["upsample_kernel_size"] == iso["strides"][1:])
    assert iso["kernel_size"] == [[3, 3, 3]] * 4 and iso["filters"] == [16, 32, 64, 128]
    # 2.5 mm slices under 0.8 mm pixels: in-plane first (kernel 1 and no pooling along z until x, y reach 1.6 mm),
    # then every axis down to 4 voxels
    aniso = topology([64, 64, 32], [0.8, 0.8, 2.5])
    assert aniso["strides"] == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert aniso["kernel_size"] == [[3, 3, 1]] + [[3, 3, 3]] * 4 and aniso["filters"] == [16, 32, 64, 128, 256]
    assert topology([512, 512, 512], [1.0, 1.0, 1.0])["filters"][-1] == 320  # capped as nnU-Net caps it
    assert topology([40, 56, 40], [1.0, 1.0, 1.0], base_filters=32)["filters"] == [32, 64, 128, 256]
    assert topology([512, 512, 512], [1.0, 1.0, 1.0], base_filters=32)["filters"] == [32, 64, 128, 256] + [320] * 4


def test_auto_topology_builds_a_dynunet_that_fits_the_patch(tiny_phantom, tmp_path):
    cfg = tiny_config(tiny_phantom, tmp_path, "dynunet", ["model.kernel_size=auto", "model.strides=auto",
                                                          "model.upsample_kernel_size=auto", "model.filters=auto"])
    complete(cfg)
    assert cfg.model.strides == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]  # 32x32x16 at 1 x 1 x 2.5 mm
    assert cfg.model.kernel_size == [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    net = instantiate(cfg.model)
    heads = outputs(net(torch.randn(2, 1, 32, 32, 16)), torch.zeros(2, 1, 32, 32, 16))
    assert [tuple(h.shape) for h in heads] == [(2, 3, 32, 32, 16)] * 3  # the main output and two deep-supervision heads


def test_a_run_reads_its_dataset_once_and_fingerprints_its_training_cases_once(tiny_phantom, tmp_path, monkeypatch):
    """The check's reading of the dataset is the one completion splits and plans from; one fingerprint serves the
    topology and plans.json."""
    calls = {"read": 0, "fingerprint": 0}

    def counted(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(checks, "dataset_problems", counted("read", checks.dataset_problems))
    monkeypatch.setattr(sources, "dataset_problems", counted("read", sources.dataset_problems))  # read_dataset's
    monkeypatch.setattr(completion, "fingerprint", counted("fingerprint", completion.fingerprint))
    cfg = tiny_config(tiny_phantom, tmp_path, "dynunet", ["model.kernel_size=auto", "model.strides=auto",
                                                          "model.upsample_kernel_size=auto", "model.filters=auto"])
    job = setup(cfg)
    plans = json.loads(save_plans(cfg, job, RunDir(tmp_path)).read_text())
    assert calls == {"read": 1, "fingerprint": 1}
    assert plans["fingerprint"]["num_cases"] == len(job.splits["train"]) and cfg.model.strides[0] == [1, 1, 1]


@pytest.mark.slow  # a planned training on real data: `make test-slow`
def test_short_planned_training_on_real_hippocampus_improves_dice(tmp_path, mlflow_store):
    subset = hippocampus_subset(tmp_path / "hippo", 12)
    cfg = tiny_config(subset, tmp_path, overrides=[
        "plan=auto", "data.batch_size=2", "data.patch_size=auto", "model.channels=[8,16,32]",
        "loss=dicece", "trainer.max_epochs=6", "trainer.val_every=1", "optimizer.lr=0.003",
        "scheduler=none",  # a constant rate, as this was measured with: cosine over 6 epochs decays too early
    ])
    result = train(cfg)
    assert list(cfg.data.patch_size) == [40, 56, 40] and list(cfg.data.spacing) == [1.0, 1.0, 1.0]  # planned
    assert cfg.transforms.normalize._target_ == "monai.transforms.NormalizeIntensityd"
    history = sorted(mlflow.MlflowClient(mlflow_store).get_metric_history(result["run_id"], "val_dice_mean"),
                     key=lambda m: m.step)
    assert len(history) == 6
    assert history[-1].value > history[0].value + 0.1, [round(m.value, 3) for m in history]


GRID_SHAPES = {  # in-plane x slices of the median case, at its in-plane spacing
    "one slice": (256, 256, 1), "30-voxel crop": (30, 30, 30), "hippocampus": (36, 50, 35),
    "cine MRI": (216, 256, 9), "brain": (256, 256, 180), "whole-body CT": (512, 512, 1000),
}


@pytest.mark.parametrize("budget", [2**14, 2**19, 2**22])
@pytest.mark.parametrize("ratio", [1.0, 3.0, 6.4, 20.0])
@pytest.mark.parametrize("shape", GRID_SHAPES, ids=list(GRID_SHAPES))
def test_every_geometry_plans_a_valid_patch_batch_and_network(shape, ratio, budget):
    cases, channels = 20, 1 + len(shape) % 4  # 1 to 4 channels
    median = np.array(GRID_SHAPES[shape])
    fp = fake_fingerprint([median.tolist()] * cases, [[0.8, 0.8, 0.8 * ratio]] * cases)
    fp["intensity"] *= channels
    try:
        p = plan(fp, ["MRI"] * channels, budget_voxels=budget)
    except InputError as err:  # only where even the smallest patch exceeds the budget, said in one line
        assert budget == 2**14 and "plan.budget_voxels=16384 holds no patch" in str(err) and "\n" not in str(err)
        return
    patch, spacing = np.array(p["patch_size"]), p["spacing"]
    net = topology(patch.tolist(), spacing)
    divisor = np.prod(net["strides"], axis=0)
    assert (patch % divisor == 0).all() and (patch >= divisor).all()  # every pooling exact
    assert (patch <= np.maximum(np.ceil(median / divisor) * divisor, 16)).all()  # no larger than the padded case
    assert patch.prod() * p["batch_size"] <= max(budget, patch.prod() * 2) and p["batch_size"] >= 2
    assert len(net["strides"]) >= 3 and len(net["filters"]) == len(net["kernel_size"]) == len(net["strides"])
    if ratio >= 6.4 and median[2] > 1:  # thick slices: convolved in-plane first, rotated in-plane only
        assert net["kernel_size"][0][2] == 1 and p["rotate_range"][:2] == [0.0, 0.0]
    DynUNet(3, channels, 3, net["kernel_size"], net["strides"], net["upsample_kernel_size"],
            filters=net["filters"], deep_supervision=True, deep_supr_num=min(2, len(net["strides"]) - 2))


def test_a_budget_below_the_smallest_patch_says_so_in_one_line():
    fp = fake_fingerprint([[256, 256, 180]] * 5, [[1.0, 1.0, 1.0]] * 5)
    with pytest.raises(InputError, match=r"plan.budget_voxels=1000 holds no patch: the smallest, \[16, 8, 8\], "
                                         r"takes 2048 voxels at plan.min_batch=2"):
        plan(fp, ["MRI"], budget_voxels=1000)


def test_thick_slices_no_longer_break_the_plan():
    # ACDC: 9 slices of 10 mm under 1.56-mm pixels, which shrank the slice axis to 0 (ZeroDivisionError)
    fp = fake_fingerprint([[216, 256, 9]] * 136, [[1.5625, 1.5625, 10.0]] * 136)
    p = plan(fp, ["MRI"], budget_voxels=2**19)
    assert p["patch_size"] == [168, 192, 8] and p["batch_size"] == 2
    assert topology(p["patch_size"], p["spacing"])["strides"][1:3] == [[2, 2, 1], [2, 2, 1]]  # in-plane first


def test_the_low_resolution_grid_coarsens_until_the_patch_covers_a_quarter_of_the_median_case():
    # a BraTS-sized case: the full-resolution patch covers 72*72*48 / (240*240*155) = 2.8% of it
    fp = fake_fingerprint([[240, 240, 155]] * 4, [[1.0, 1.0, 1.0]] * 4)
    full, low = (plan(fp, ["MRI"], 2**19, max_batch_3d=2, grid=g) for g in ("full", "low"))
    assert full["grid"] == "full grid" and full["spacing"] == [1.0, 1.0, 1.0]
    assert np.prod(low["patch_size"]) >= 0.25 * np.prod(low["median_shape"])  # the rule, on the grid it chose
    step = low["spacing"][0] / planning.LOWRES_STEP  # one step finer, the patch still covered under a quarter
    assert np.prod(low["patch_size"]) < 0.25 * np.prod(np.array([240, 240, 155]) / step) * 1.04
    assert low["spacing"][0] == low["spacing"][2] > 1.5 and low["grid"].startswith("low grid: ")  # isotropic stays so
    # a thick-slice CT: the in-plane axes coarsen first (nnU-Net's order) until within 2x of the 5-mm axis, then all
    fp = fake_fingerprint([[512, 512, 60]] * 4, [[0.7, 0.7, 5.0]] * 4)
    low = plan(fp, ["CT"], 2**19, max_batch_3d=2, grid="low")
    assert low["spacing"][2] / low["spacing"][0] <= 2 and low["spacing"][0] / 0.7 > 3 * low["spacing"][2] / 5.0
    with pytest.raises(InputError, match=r"^plan.grid=lo: must be full or low$"):
        plan(fp, ["CT"], 2**19, grid="lo")
    # a patch that covers the case already (hippocampus crops; a 2D slice whole): the grid stays full
    for shape, spacing, dims in (([36, 50, 35], [1.0, 1.0, 1.0], 3), ([216, 256, 9], [1.5625, 1.5625, 10.0], 2)):
        p = plan(fake_fingerprint([shape] * 10, [spacing] * 10), ["MRI"], 2**19, dims=dims, grid="low")
        assert p["grid"] == "full grid" and p["spacing"] == spacing


def test_thick_axial_slices_plan_a_2d_network_whose_batch_takes_the_budget():
    fp = fake_fingerprint([[216, 256, 9]] * 136, [[1.5625, 1.5625, 10.0]] * 136)
    p = plan(fp, ["MRI"], budget_voxels=2**19, dims="auto", max_batch_3d=2)
    assert p["dims"] == 2 and p["dims_why"] == "slices 6.4x as far apart as pixels (2D from 3x)"
    assert p["patch_size"] == [216, 256, 1] and p["batch_size"] == 2**19 // (216 * 256)  # 9 slices a step
    assert p["rotate_range"] == [0.0, 0.0, 0.26]
    net = topology(p["patch_size"], p["spacing"])
    assert all(k[2] == 1 for k in net["kernel_size"]) and all(s[2] == 1 for s in net["strides"])
    # near-isotropic data (IBSR's 1.5 mm against 0.94 mm, hippocampus) stay 3D, with the recipe's batch of 2
    for shape, spacing in (([144, 115, 139], [0.9375, 1.5, 0.9375]), ([36, 50, 35], [1.0, 1.0, 1.0])):
        p = plan(fake_fingerprint([shape] * 10, [spacing] * 10), ["MRI"], 2**19, dims="auto", max_batch_3d=2)
        assert p["dims"] == 3 and p["batch_size"] == 2


def test_the_auto_recipe_plans_acdc_as_a_2d_dynunet_applied_slice_by_slice(tmp_path, monkeypatch):
    monkeypatch.setattr(planning, "step_seconds", lambda *_: 3.0)  # 16 wide
    subset = shared_subset("acdc_cardiac", tmp_path / "acdc", 12)
    cfg = compose_config("train", ["experiment=auto", f"data.root={subset}"], tmp_path)
    complete(cfg)
    assert cfg.plan.dims == 2 and list(cfg.data.patch_size)[2] == 1 and cfg.data.batch_size > 2
    assert cfg.model._target_ == "pipeline.models.slicewise.SliceWise" and cfg.model.net.spatial_dims == 2
    assert cfg.transforms.augment.flip_z is None and cfg.transforms.augment.flip_x is not None  # TTA: in-plane
    model = instantiate(cfg.model)
    assert model.run_name == "DynUNet2D"
    x = torch.randn(2, 1, *cfg.data.patch_size[:2], 3)  # three slices of two cases
    heads = outputs(model.train()(x), torch.zeros(2, 1, *x.shape[2:]))
    assert [tuple(h.shape) for h in heads] == [(2, 4, *x.shape[2:])] * 3  # the main output and two heads
    with torch.no_grad():  # slice by slice: a slice's prediction does not depend on its neighbours
        model.eval()
        assert torch.allclose(model(x)[..., 1], model(x[..., 1:2])[..., 0], atol=1e-5)
