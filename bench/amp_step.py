"""Mixed precision vs fp32: seconds per training step of each model, and the speed-up, measured in the same run.

    .venv/bin/python bench/amp_step.py [--models unet3d conv3d unet2d] [--steps 8] [--batch 4]

On CPU `trainer.amp=auto` means bf16 autocast; on CUDA fp16 autocast with a GradScaler.
"""

import argparse
import time

import torch
from hydra.utils import instantiate

from pipeline import engine
from pipeline.config import compose


def seconds_per_step(model, loss_fn, x, y, device, dtype, steps: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    times = []
    for _ in range(steps + 2):  # two warm-up steps (allocator, oneDNN/cuDNN kernel choice)
        start = time.perf_counter()
        with engine.autocast(device, dtype):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[len(times[2:]) // 2]  # median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["unet3d", "conv3d", "unet2d"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = engine.pick_device(args.device)
    amp = engine.amp_dtype("auto", device)
    print(f"device {device}, threads {torch.get_num_threads()}, amp {amp}, batch {args.batch}, median of {args.steps} steps")
    for name in args.models:
        cfg = compose("train", [f"model={name}", "data.root=unused", "+data.num_classes=3", "+data.in_channels=1"])
        torch.manual_seed(0)
        patch = list(cfg.data.patch_size)
        x = torch.randn(args.batch, 1, *patch, device=device)
        y = torch.randint(0, 3, (args.batch, 1, *patch), device=device)
        loss_fn = instantiate(cfg.loss)
        fp32 = seconds_per_step(instantiate(cfg.model).to(device), loss_fn, x, y, device, None, args.steps)
        mixed = seconds_per_step(instantiate(cfg.model).to(device), loss_fn, x, y, device, amp, args.steps)
        print(f"{name:8s} patch {patch}: fp32 {fp32:.3f} s/step, {str(amp).removeprefix('torch.')} {mixed:.3f} s/step, speed-up x{fp32 / mixed:.2f}")


if __name__ == "__main__":
    main()
