"""Every network of conf/model/ at its default width: parameter count and seconds per training step on this machine.

    .venv/bin/python bench/models.py [--patch 64 64 32] [--batch 2] [--steps 5] [--amp auto|false]

One step = forward, loss (DiceLoss, deep supervision where the network emits it), backward and an Adam step on a
random batch shaped like the demo data's (1 channel, 3 classes). Median of `steps` after one warm-up step. Prints
the table and writes it to docs/results/models.{md,json} (about 2 minutes on a 2-core CPU).
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from monai.losses import DeepSupervisionLoss

from pipeline import project_root
from pipeline.core import hardware
from pipeline.core.config import compose
from pipeline.training import engine, planning

from common import RESULTS, machine, machine_line, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--amp", default="auto")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where models.md and models.json go")
    args = parser.parse_args()
    device = hardware.pick_device()
    chosen = hardware.resolve(args.amp, device)
    dtype = chosen.dtype
    print(hardware.describe(device))
    print(f"patch {args.patch}, batch {args.batch}, {device}, {chosen}, channels_last_3d weights")
    print(f"{'model':16s} {'class':22s} {'parameters':>12s} {'s/step':>8s}")
    rows = []
    for model in sorted(p.stem for p in (project_root() / "conf" / "model").glob("*.yaml")):
        overrides = [f"model={model}", "data.in_channels=1", "data.num_classes=3", f"data.patch_size={args.patch}"]
        cfg = compose("train", overrides)
        if model == "dynunet":  # its topology is planned (`auto`): nnU-Net's rule for this patch at isotropic spacing
            cfg.model.merge_with(planning.topology(list(args.patch), [1.0, 1.0, 1.0]))
        # as training runs it (trainer.channels_last)
        net = hardware.channels_last(instantiate(cfg.model).to(device).train())
        size = list(args.patch)
        if hasattr(net, "valid_input_size"):  # the 2015 valid U-Net needs exact poolings: nearest valid patch
            size = [net.valid_input_size(s) for s in size]
        loss = DeepSupervisionLoss(instantiate(cfg.loss), weight_mode="exp")
        optimizer = torch.optim.Adam(net.parameters())
        batch = {"image": torch.randn(args.batch, 1, *size),
                 "label": torch.randint(0, 3, (args.batch, 1, *size)).float()}
        times = []
        for _ in range(args.steps + 1):
            start = time.perf_counter()
            value = engine.batch_loss(net, batch, loss, device, dtype)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        params = sum(p.numel() for p in net.parameters() if p.requires_grad)
        name = getattr(net, "run_name", type(net).__name__)
        rows.append({"model": model, "class": name, "parameters": params, "seconds": statistics.median(times[1:]),
                     "patch": size})
        print(f"{model:16s} {name:22s} {params:12,d} {rows[-1]['seconds']:8.3f}"
              + (f"  (patch {size})" if size != list(args.patch) else ""), flush=True)
    results = {"machine": machine(), "device": str(device), "precision": str(chosen), "patch": args.patch,
               "batch": args.batch, "models": rows}
    lines = ["# Networks: size and training step", "",
             "Written by `bench/models.py` (do not edit by hand): every `conf/model/` network at its default width, "
             f"one training step (forward, DiceLoss, backward, Adam) on a batch of {args.batch} patches of "
             f"{'x'.join(map(str, args.patch))} (1 channel, 3 classes), median of {args.steps} after a warm-up; "
             f"{device}, {chosen}.", "", machine_line(results["machine"]), "",
             "| model | network | parameters | s / step |", "| --- | --- | --- | --- |"]
    lines += [f"| `model={r['model']}` | {r['class']} | {r['parameters']:,d} | {r['seconds']:.3f}"
              + (f" (patch {'x'.join(map(str, r['patch']))})" if r["patch"] != list(args.patch) else "") + " |"
              for r in rows]
    print(f"wrote {write('models', results, chr(10).join(lines), args.results)}")


if __name__ == "__main__":
    main()
