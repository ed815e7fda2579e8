"""Whole-volume inference at clinical size: MONAI's plain call against the project's paths, in one run.

    .venv/bin/python bench/infer.py [--tasks brats ibsr] [--large]       # about 10 minutes on a 2-core CPU
    .venv/bin/python bench/infer.py --tasks ibsr --tta --model ibsr=<run>/checkpoints/last.pt

Two volumes, each with the model experiment=auto trains for its task: bench/auto.py's fold 0 where it ran, else one
trained here for a few minutes (seed 0, kept in outputs/bench/infer/<task>/):
  brats  a 240x240x155 FLAIR+T1c validation volume of ../shared/data/brats2015_subset
  ibsr   a 256x128x256 T1 validation brain of ../shared/data/ibsr18_brain_tissue (4D as distributed; the plan crops
         it to the brain and resamples it to the median spacing)
Each is segmented several ways, each in a fresh process so peak RSS is its own, each timed on a first and a second
(warm) call, as in a folder run:
  baseline            `monai.inferers.sliding_window_inference` with MONAI's defaults (fp32, sw_batch_size 1,
                      overlap 0.25) between the same preprocessing and its inversion
  project             `pipeline.infer.Predictor` as `python -m pipeline.infer` runs it (amp=auto: fp32 on the CPU,
                      backend=auto: the network exported to ONNX and run by OpenVINO at f32), sw_batch_size 2
  project-torch       the same on `backend=torch` (eager PyTorch, channels_last_3d weights)
  project-ncdhw       the same with plain NCDHW weights (what channels_last buys)
  project-compile     the same with `compile=true` (torch.compile, frozen weights), sw_batch_size 1
  project-onnxruntime the same with `backend=onnxruntime` (ONNX Runtime's CPU kernels)
  project-bf16        the same with `amp=bf16` on torch (30-90x slower where the CPU has no native bf16: skipped there)
All share the window size, overlap and blending (only speed may differ). With --tta, mirror test-time augmentation,
each timed on one volume (its first, an export included), scored against the truth as well:
  baseline-tta        the obvious way: the baseline on each mirrored volume (every subset of the axes the model's
                      training mirrored: 8 for experiment=auto), softmax averaged
  project-tta-volumes the project's network (OpenVINO) and the baseline's windows, mirrored the baseline's way
  project-tta         `tta=true` (each window's mirrors averaged inside one sliding window) with the baseline's windows
  project-tta-recipe  `tta=true` as shipped: the checkpoint's windows (overlap 0.5, Gaussian weights)
  project-tta-0.25    the same at overlap 0.25 (about 2.4x fewer windows on a brain)
  project-recipe      no TTA, as shipped Prints and writes to
docs/results/infer.{md,json} the machine, seconds, voxels/s and peak RSS of each, the speed ratios and the Dice between
each label map and the baseline's. `--large` adds the peak RSS of the project path on a synthetic 512x512x400 volume.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from pipeline import project_root
from pipeline.core import hardware
from pipeline.core.config import compose
from pipeline.core.rundir import RunDir

from common import RESULTS, machine, machine_line, shared_data, write
from convert import brats_as_msd

OUT = project_root() / "outputs" / "bench" / "infer"
# Each project variant's fastest sw_batch_size here: 2 for eager fp32 (3.05 s against 3.70 with 1), 1 when compiled
# (one static window shape; 2.27 s against 2.29 with 2).
PROJECT = {
    "project": {"amp": "auto", "sw_batch_size": 2},
    "project-torch": {"amp": "auto", "sw_batch_size": 2, "backend": "torch"},
    "project-ncdhw": {"amp": "auto", "sw_batch_size": 2, "backend": "torch", "channels_last": False},
    "project-compile": {"amp": "auto", "sw_batch_size": 1, "compile": True},
    "project-onnxruntime": {"sw_batch_size": 2, "backend": "onnxruntime"},
    "project-bf16": {"amp": "bf16", "sw_batch_size": 2, "backend": "torch"},
}
# With --tta (timed once each: eight passes a volume); "recipe": the checkpoint's own windows, else the baseline's.
TTA = {
    "project-tta-volumes": {},  # the project's network and windows, mirrored as whole volumes (worker)
    "project-tta": {"tta": True, "sw_batch_size": 2},
    "project-tta-recipe": {"tta": True, "recipe": True},
    "project-tta-0.25": {"tta": True, "recipe": True, "overlap": 0.25},
    "project-recipe": {"recipe": True},
}


def trained(task: str, overrides: list[str]) -> Path:
    """experiment=auto's model of the task: --model's, else bench/auto.py's fold 0, else one trained here once (seed
    0, fold 0, no validation) into outputs/bench/infer/<task>/model."""
    if task in MODELS:
        return MODELS[task]
    if (auto := RunDir(project_root() / "outputs" / "bench" / "auto" / task / "folds" / "0")).last.is_file():
        return auto.last
    run = RunDir(OUT / task / "model")
    if not run.last.exists():
        from pipeline.training.run import train

        train(compose("train", [*overrides, "tracking=none", "seed=0", "trainer.max_epochs=1000",
                                "trainer.val_every=1000", f"paths.run_dir={run.root}"]))
    return run.last


def brats(data: Path) -> tuple[Path, Path]:
    """The BRATS subset as an MSD dataset (two channels stacked as 4D NIfTI), its model, one volume."""
    root = brats_as_msd(data / "brats2015_subset", OUT / "brats" / "dataset")
    ckpt = trained("brats", ["experiment=auto", f"data.root={root}", "data.split.folds=4", "data.fold=0",
                             "trainer.max_minutes=3"])
    case = json.loads((ckpt.parent.parent / "splits.json").read_text())["val"][0]
    return ckpt, root / "imagesTr" / f"{case}.nii.gz"


def ibsr(data: Path) -> tuple[Path, Path]:
    """The IBSR brains' model and a validation brain as shipped."""
    root = data / "ibsr18_brain_tissue"
    ckpt = trained("ibsr", ["experiment=auto", f"data.root={root}", "data.fold=0", "trainer.max_minutes=3"])
    case = json.loads((ckpt.parent.parent / "splits.json").read_text())["val"][0]
    return ckpt, root / "imagesTr" / f"{case}.nii.gz"


TASKS = {"brats": brats, "ibsr": ibsr}
MODELS = {}  # task -> checkpoint, from --model
VOLUME_TTA = ("baseline-tta", "project-tta-volumes")  # mirrored as whole volumes, one sliding window each


def worker(mode: str, ckpt: Path, volume: Path, out: Path) -> None:
    """One inference in this process; prints seconds and peak RSS as JSON."""
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import Compose, Invertd
    from omegaconf import OmegaConf

    from pipeline.data.transforms import preprocess
    from pipeline.inference.predictor import Predictor, mirrored_axes, mirrors, predict
    from pipeline.models import checkpoint
    from pipeline.models.export import build_model

    bundle = checkpoint.load(ckpt)
    cfg = OmegaConf.create(bundle["config"])
    if mode in ("baseline", *VOLUME_TTA):
        axes = mirrored_axes([bundle["config"]])  # the axes the project mirrors: the same passes
        flips = mirrors(axes) if mode in VOLUME_TTA else [[]]
        if mode == "project-tta-volumes":  # the project's network and windows, the baseline's way of mirroring
            bundle["config"]["trainer"]["inferer"]["mode"] = "constant"
            predictor = Predictor({ckpt: bundle}, overlap=0.25, sw_batch_size=2)
            (network, inferer), pre = predictor.members[0], predictor.preprocess

            def logits_of(image):
                return predict(network, image, inferer, predictor.device, predictor.dtype)
        else:
            model, pre = build_model(bundle), Compose(preprocess(cfg))

            def logits_of(image):
                return sliding_window_inference(image, list(cfg.data.patch_size), 1, model)

        def segment():
            data = pre({"image": str(volume)})
            probs = 0
            with torch.no_grad():
                for f in flips:  # the whole volume mirrored, predicted, mirrored back
                    dims = [d + 2 for d in f]
                    logits = logits_of(torch.flip(data["image"][None], dims))
                    probs = probs + torch.flip(torch.softmax(logits, 1), dims)
            data["pred"] = probs[0].argmax(0, keepdim=True).to(torch.uint8)
            return Invertd(keys="pred", transform=pre, orig_keys="image")(data)["pred"].numpy()[0]
    else:
        options = dict(PROJECT.get(mode) or TTA[mode])
        if not options.pop("recipe", False):  # the baseline's windows and blending: only speed may differ
            bundle["config"]["trainer"]["inferer"]["mode"] = "constant"
            options.setdefault("overlap", 0.25)
        # built inside the first call (an export or a compile counts there), but before a TTA path's one timed call
        predictor = Predictor({ckpt: bundle}, **options) if mode in TTA else None

        def segment():
            nonlocal predictor
            predictor = predictor or Predictor({ckpt: bundle}, **options)
            return predictor(volume)[0]
    times = []
    once = "512" in volume.name or mode in (*VOLUME_TTA, *TTA)  # a large volume, eight passes: one timed call
    for _ in range(1 if once else 2):  # a fresh process, then warm (kernels chosen, memory mapped)
        start = time.perf_counter()
        labels = segment()
        times.append(time.perf_counter() - start)
    np.save(out, labels.astype(np.uint8))
    print(json.dumps({"first": times[0], "seconds": times[-1], "rss_mb": peak_rss_mb(), "voxels": int(labels.size)}))


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM, which (unlike getrusage's maxrss) is not inherited across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(mode: str, ckpt: Path, volume: Path) -> tuple[dict, np.ndarray]:
    out = OUT / f"{mode}-{volume.stem}.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, __file__, "--worker", mode, "--ckpt", str(ckpt), "--volume", str(volume),
                           "--out", str(out)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{mode} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), np.load(out)


def line(r: dict) -> str:
    return (f"{r['seconds']:6.2f} s warm ({r['first']:5.2f} s first) {r['voxels'] / r['seconds'] / 1e6:6.2f} M voxels/s"
            f"  peak RSS {r['rss_mb']:6.0f} MB")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the foreground classes present in either map."""
    classes = [c for c in np.union1d(np.unique(a), np.unique(b)) if c]
    return float(np.mean([2 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum()) for c in classes]))


def measure(task: str, ckpt: Path, volume: Path, native_bf16: bool, why: str, tta: bool = False) -> dict:
    """Every path on one volume: each baseline first, then each project variant against it (and the truth)."""
    shape = nib.load(volume).shape
    print(f"{task}: volume {volume.name} {shape}, model {ckpt}")
    truth = np.asarray(nib.load(volume.parent.parent / "labelsTr" / volume.name).dataobj)
    rows = {}
    for baseline, modes in (("baseline", PROJECT), *((("baseline-tta", TTA),) if tta else ())):
        base, base_labels = run(baseline, ckpt, volume)
        rows[baseline] = base | {"dice_to_truth": dice(truth.reshape(base_labels.shape), base_labels)}
        print(f"  {baseline:36s} {line(base)}  Dice to truth {rows[baseline]['dice_to_truth']:.4f}")
        for mode in modes:
            if mode == "project-bf16" and not native_bf16:
                rows[mode] = {"skipped": f"{why} (oneDNN would emulate bf16, 30-90x slower)"}
                print(f"  {mode:36s} skipped: {rows[mode]['skipped']}")
                continue
            r, labels = run(mode, ckpt, volume)
            r.update(against=baseline, speedup_warm=base["seconds"] / r["seconds"],
                     speedup_first=base["first"] / r["first"], dice_to_baseline=dice(base_labels, labels),
                     voxels_equal=float((base_labels == labels).mean()),
                     dice_to_truth=dice(truth.reshape(labels.shape), labels))
            rows[mode] = r
            print(f"  {mode:36s} {line(r)}  speed ratio x{r['speedup_warm']:.2f} warm (x{r['speedup_first']:.2f} "
                  f"first)  Dice to {baseline} {r['dice_to_baseline']:.4f}, to truth {r['dice_to_truth']:.4f}")
    model = ckpt.resolve()
    return {"volume": volume.name, "shape": list(shape),
            "model": str(model.relative_to(project_root()) if model.is_relative_to(project_root()) else model),
            "paths": rows}


NAMES = {"baseline": "MONAI `sliding_window_inference`, fp32 (the baseline)",
         "project": "default: OpenVINO at f32 (`backend=auto` on a CPU), `sw_batch_size` 2",
         "project-torch": "`backend=torch`: eager fp32, channels_last_3d weights",
         "project-ncdhw": "`backend=torch`, NCDHW weights", "project-compile": "`compile=true` (torch)",
         "project-onnxruntime": "`backend=onnxruntime`", "project-bf16": "`amp=bf16` (torch)",
         "baseline-tta": "MONAI `sliding_window_inference` on each mirrored volume, fp32 (the TTA baseline)",
         "project-tta-volumes": "the default network (OpenVINO), the baseline's windows, whole volumes mirrored",
         "project-tta": "`tta=true`: the mirrors inside each window, the baseline's windows",
         "project-tta-recipe": "`tta=true` as shipped: the checkpoint's windows (overlap 0.5, Gaussian)",
         "project-tta-0.25": "`tta=true overlap=0.25`, Gaussian", "project-recipe": "no TTA, as shipped (overlap "
         "0.5, Gaussian)"}


def page(classes: dict) -> str:
    """The results page: a section per CPU class measured (the latest run of each), one table per volume."""
    lines = ["# Whole-volume inference", "",
             "Written by `bench/infer.py` (do not edit by hand). Each path in a fresh process: *first* is its first "
             "volume (an export or compile included), *warm* a second volume in the same process; peak RSS is the "
             "process's; a TTA path (a pass per mirror) is timed once, after its model is loaded. Speed-ups are "
             "against the baseline's time in the same run (a TTA path's: the TTA baseline's); Dice is each label "
             "map's mean foreground Dice to that baseline's, and to the volume's truth. One section per CPU class.",
             ""]
    for cpu, results in classes.items():
        lines += [f"## {cpu.split(': ', 1)[-1]}", "", machine_line(results["machine"]), ""]
        for task, r in results["tasks"].items():
            lines += [f"### {task}: {r['volume']} {'x'.join(map(str, r['shape']))}", "", f"Model: `{r['model']}`.",
                      "", "| path | warm s | first s | M voxels/s | peak RSS MB | speed-up warm / first | Dice to "
                      "baseline | Dice to truth |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for mode, m in r["paths"].items():
                if "skipped" in m:
                    lines.append(f"| {NAMES[mode]} | skipped: {m['skipped']} | | | | | | |")
                    continue
                ratio = f"x{m['speedup_warm']:.2f} / x{m['speedup_first']:.2f}" if "speedup_warm" in m else "1"
                agree = f"{m['dice_to_baseline']:.4f}" if "dice_to_baseline" in m else ""
                truth = f"{m['dice_to_truth']:.4f}" if "dice_to_truth" in m else ""
                lines.append(f"| {NAMES[mode]} | {m['seconds']:.2f} | {m['first']:.2f} | "
                             f"{m['voxels'] / m['seconds'] / 1e6:.2f} | {m['rss_mb']:.0f} | {ratio} | {agree} | "
                             f"{truth} |")
            lines.append("")
        if "large" in results:
            g = results["large"]
            lines += [f"Synthetic 512x512x400 volume (2 channels), the project path with the BRATS model: "
                      f"{g['seconds']:.0f} s, peak RSS {g['rss_mb'] / 1024:.2f} GiB.", ""]
    return "\n".join(lines)


def merged(results: dict, path: Path) -> dict:
    """This run's results beside the other CPU classes' in the results file (one written before the classes were
    kept apart is one class's)."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    old = {old["machine"]["cpu"]: old} if "machine" in old else old
    return old | {results["machine"]["cpu"]: results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=shared_data(), help="the folder holding the tasks' data")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--large", action="store_true", help="also the project path's peak RSS on 512x512x400x2")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where infer.md and infer.json go")
    parser.add_argument("--model", nargs="+", default=[], metavar="TASK=CKPT", help="a task's model (default: "
                        "bench/auto.py's fold 0, else one trained here)")
    parser.add_argument("--tta", action="store_true", help="also mirror TTA: the obvious way against the project's")
    parser.add_argument("--worker", choices=["baseline", *PROJECT, *VOLUME_TTA, *TTA])
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--volume", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.ckpt, args.volume, args.out)

    MODELS.update({task: Path(ckpt) for task, ckpt in (m.split("=", 1) for m in args.model)})
    models = {task: TASKS[task](args.data) for task in args.tasks}  # trained first: timings run on a quiet machine
    print(hardware.describe(torch.device("cpu")))
    native_bf16, why = hardware.cpu_bf16()
    results = {"machine": machine(),
               "tasks": {t: measure(t, *m, native_bf16, why, args.tta) for t, m in models.items()}}
    if args.large:
        big = OUT / "synthetic_512x512x400x2.nii"
        if not big.exists():
            rng = np.random.default_rng(0)
            data = rng.normal(size=(512, 512, 400, 2)).astype(np.float32)
            nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 1.0, 1.0])), big)
            del data
        results["large"], _ = run("project", brats(args.data)[0], big)
        print(f"synthetic 512x512x400 (2 channels): {results['large']['seconds']:.0f} s, "
              f"peak RSS {results['large']['rss_mb'] / 1024:.2f} GiB")
    classes = merged(results, args.results / "infer.json")
    print(f"wrote {write('infer', classes, page(classes), args.results)}")


if __name__ == "__main__":
    main()
