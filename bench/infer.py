"""Whole-volume inference: the plain MONAI call against the project's path, on a BRATS-size volume, one run.

    .venv/bin/python bench/infer.py [--data ../shared/data/brats2015_subset] [--large]

A fixed 2-channel model (a 3D UNet trained once for 3 minutes on the BRATS subset, seed 0, kept in
outputs/bench/brats/) segments one 240x240x155 FLAIR+T1c volume several ways, each in a fresh process so peak RSS is
its own, each timed on a first and a second (warm) call, as in a folder run:
  baseline            `monai.inferers.sliding_window_inference` with MONAI's defaults (fp32, sw_batch_size 1,
                      overlap 0.25)
  project             `pipeline.infer.Predictor` as `python -m pipeline.infer` runs it (amp=auto: fp32 on the CPU,
                      backend=auto: the network exported to ONNX and run by OpenVINO at f32), sw_batch_size 2
  project-torch       the same on `backend=torch` (eager PyTorch, channels_last_3d weights)
  project-ncdhw       the same with plain NCDHW weights (what channels_last buys)
  project-compile     the same with `compile=true` (torch.compile, frozen weights), sw_batch_size 1
  project-onnxruntime the same with `backend=onnxruntime` (ONNX Runtime's CPU kernels)
  project-bf16        the same with `amp=bf16` on torch (30-90x slower where the CPU has no native bf16: skipped there)
All share the window size, overlap and blending (only speed may differ), preprocessing and its inversion. Prints
the CPU class, seconds, voxels/s and peak RSS of each, the speed ratios and the Dice between each label map and the
baseline's. `--large` adds the peak RSS of the project path on a synthetic 512x512x400 volume.
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

from pipeline import hardware, project_root
from pipeline.config import compose, shared_data
from pipeline.data.convert import brats_as_msd
from pipeline.rundir import RunDir

OUT = project_root() / "outputs" / "bench" / "brats"
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


def prepare(data: Path) -> tuple[Path, Path]:
    """The BRATS subset as an MSD dataset (two channels stacked as 4D NIfTI) and a model trained on it once."""
    root, trained = brats_as_msd(data, OUT / "dataset"), RunDir(OUT / "model")
    if not trained.best.exists():
        from pipeline.training import train

        cfg = compose("train", ["data=msd", f"data.root={root}", "data.patch_size=[96,96,64]", "data.split.val=0.25",
                                "data.split.test=0", "data.batch_size=1", "loss=dicece", "tracking=none",
                                "trainer.max_epochs=1000", "trainer.max_minutes=3", "trainer.val_every=1000", "seed=0",
                                f"paths.run_dir={trained.root}"])
        train(cfg)
    return root, trained.best


def worker(mode: str, ckpt: Path, volume: Path, out: Path) -> None:
    """One inference in this process; prints seconds and peak RSS as JSON."""
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import Compose, Invertd
    from omegaconf import OmegaConf

    from pipeline import checkpoint
    from pipeline.data.transforms import preprocess
    from pipeline.inference import Predictor
    from pipeline.models.export import build_model

    bundle = checkpoint.load(ckpt)
    cfg = OmegaConf.create(bundle["config"])
    if mode == "baseline":
        model, pre = build_model(bundle), Compose(preprocess(cfg))

        def segment():
            data = pre({"image": str(volume)})
            with torch.no_grad():
                logits = sliding_window_inference(data["image"][None], list(cfg.data.patch_size), 1, model)
            data["pred"] = logits[0].argmax(0, keepdim=True).to(torch.uint8)
            return Invertd(keys="pred", transform=pre, orig_keys="image")(data)["pred"].numpy()[0]
    else:
        bundle["config"]["trainer"]["inferer"]["mode"] = "constant"  # the baseline's blending: only speed may differ
        predictor = None

        def segment():
            nonlocal predictor
            if predictor is None:  # built inside the first call: an export or a compile counts there
                predictor = Predictor({ckpt: bundle}, overlap=0.25, **PROJECT[mode])
            return predictor(volume)[0]
    times = []
    for _ in range(1 if "512" in volume.name else 2):  # a fresh process, then warm (kernels chosen, memory mapped)
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


def main() -> None:
    default = str(shared_data() / "brats2015_subset")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=default)
    parser.add_argument("--large", action="store_true", help="also the project path's peak RSS on 512x512x400x2")
    parser.add_argument("--worker", choices=["baseline", *PROJECT])
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--volume", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.ckpt, args.volume, args.out)

    root, ckpt = prepare(Path(args.data))
    volume = sorted((root / "imagesTr").iterdir())[-1]
    print(hardware.describe(torch.device("cpu")))
    native_bf16, why = hardware.cpu_bf16()
    print(f"volume {volume.name} {nib.load(volume).shape}, model {ckpt}")
    base, base_labels = run("baseline", ckpt, volume)
    print(f"{'MONAI sliding_window_inference, fp32':38s} {line(base)}")
    for mode in PROJECT:
        if mode == "project-bf16" and not native_bf16:
            print(f"{mode:38s} skipped: {why} (oneDNN would emulate bf16, 30-90x slower)")
            continue
        r, labels = run(mode, ckpt, volume)
        print(f"{mode:38s} {line(r)}  speed ratio x{base['seconds'] / r['seconds']:.2f} warm"
              f" (x{base['first'] / r['first']:.2f} first)"
              f"  Dice to baseline {dice(base_labels, labels):.4f}, voxels equal {(base_labels == labels).mean():.5f}")
    if args.large:
        big = OUT / "synthetic_512x512x400x2.nii"
        if not big.exists():
            rng = np.random.default_rng(0)
            data = rng.normal(size=(512, 512, 400, 2)).astype(np.float32)
            nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 1.0, 1.0])), big)
            del data
        r, _ = run("project", ckpt, big)
        print(f"synthetic 512x512x400 (2 channels): {r['seconds']:.0f} s, peak RSS {r['rss_mb']:.0f} MB"
              f" ({r['rss_mb'] / 1024:.2f} GiB)")


if __name__ == "__main__":
    main()
