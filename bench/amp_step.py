"""Seconds per training step by precision and kernel option, against plain fp32 measured in the same run.

    .venv/bin/python bench/amp_step.py [--models unet3d conv3d] [--steps 5] [--rounds 3] [--batch 4] [--no-compile]

Rows per model, each a fresh copy of the same initial weights on the same batch (4 patches of 64x64x32, 1 channel,
3 classes), one step = forward, DiceLoss, backward, Adam:
  fp32                 plain fp32, NCDHW weights: the baseline every ratio is against
  fp32 1 thread        the same on one thread (what the thread count buys)
  fp32 channels_last   channels_last_3d weights (oneDNN's channels-last kernels)
  fp32 compile (+cl)   torch.compile of the network; its compile seconds and the steps they take to pay back
  bf16 (+cl)           bf16 autocast; where the CPU only emulates bf16 one step is timed (20x fp32 or more)
  bf16 compile + cl    where bf16 is native: compiled, its payback counted against bf16 channels_last
  auto                 what `trainer.amp=auto` with the default `trainer.channels_last` runs here, and its ratio to the
                       fastest row
The fp32 rows are measured in interleaved rounds and each keeps its best round: a shared VM's speed drifts by 20% or
more between minutes, which one pass per row mistakes for a difference between rows.
The first line names the CPU class: these figures hold for that class only. Writes the table to
docs/results/amp_step.{md,json} (a few minutes on a 2-core CPU; `--no-compile` about one).
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from monai.losses import DeepSupervisionLoss

from pipeline.core import hardware
from pipeline.core.config import compose
from pipeline.training import engine

from common import RESULTS, machine, machine_line, write


def seconds_per_step(model, loss_fn, batch: dict, device, dtype, steps: int, give_up_after: float | None = None):
    """(median seconds per step after two warm-up steps, steps timed). A first step slower than `give_up_after`
    seconds is the answer on its own (emulated bf16: minutes per step)."""
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    times = []
    for i in range(steps + 2):  # two warm-up steps (allocator, oneDNN/cuDNN kernel choice, compilation)
        start = time.perf_counter()
        loss = engine.batch_loss(model, batch, loss_fn, device, dtype)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if i == 0 and give_up_after is not None and times[0] > give_up_after:
            return times[0], 1
    return statistics.median(times[2:]), steps


class Rows:
    """One model's rows: seconds per step by setting, each from a fresh copy of the same weights on the same batch."""

    def __init__(self, name: str, args, device):
        self.name, self.steps, self.device = name, args.steps, device
        cfg = compose("train", [f"model={name}", "data.root=unused", "+data.num_classes=3", "+data.in_channels=1",
                                f"data.patch_size=[{','.join(map(str, args.patch))}]"])
        torch.manual_seed(0)
        self.batch = {"image": torch.randn(args.batch, 1, *args.patch),
                      "label": torch.randint(0, 3, (args.batch, 1, *args.patch))}
        self.loss_fn = DeepSupervisionLoss(instantiate(cfg.loss), weight_mode="exp")
        self.initial = instantiate(cfg.model).to(device)
        self.seconds, self.extra, self.shown = {}, {}, []

    def measure(self, label, dtype=None, cl=False, compiled=False, threads=None, give_up_after=None,
                eager="fp32") -> None:
        """Seconds per step of one row, kept if faster than an earlier round of it; a compiled row's payback is
        counted against the `eager` row."""
        model = copy.deepcopy(self.initial)
        if cl:
            hardware.channels_last(model)
        net = torch.compile(model) if compiled else model
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        seconds, timed = seconds_per_step(net, self.loss_fn, self.batch, self.device, dtype, self.steps, give_up_after)
        self.extra[label] = ""
        if compiled:  # the compile is paid once: the warm-up steps' excess over two ordinary steps
            compile_s = time.perf_counter() - start - seconds * (timed + 2)
            saved = self.seconds[eager] - seconds
            pays = f"pays back after {compile_s / saved:.0f} steps" if saved > 0 else "never pays back"
            self.extra[label] = f"  compile {compile_s:.0f} s, {pays}"
        if timed < self.steps:
            self.extra[label] = "  (first step only: over 20x fp32)"
        torch.set_num_threads(before)
        self.seconds[label] = min(seconds, self.seconds.get(label, seconds))

    def show(self, label: str, title: str | None = None, tail: str | None = None) -> None:
        seconds, ratio = self.seconds[label], self.seconds["fp32"] / self.seconds[label]
        note = self.extra[label] if tail is None else tail
        self.shown.append({"model": self.name, "row": title or label, "seconds": seconds, "vs_fp32": ratio,
                           "note": note.strip(" ,")})
        print(f"{self.name:8s} {title or label:22s} {seconds:8.3f} s/step  x{ratio:5.2f} vs fp32{note}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["unet3d", "conv3d"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved passes over the fp32 rows")
    parser.add_argument("--batch", type=int, default=4, help="patches per step")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (about a minute each)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where amp_step.md and amp_step.json go")
    args = parser.parse_args()
    device = hardware.pick_device(args.device)
    auto = hardware.resolve("auto", device)
    defaults = compose("train", ["data.root=unused"])
    print(hardware.describe(device))
    setting = (f"{auto}; trainer.channels_last={defaults.trainer.channels_last}; {args.batch} patches of "
               f"{'x'.join(map(str, args.patch))}, median of {args.steps} steps, best of {args.rounds} rounds")
    print(setting)
    table = []
    for name in args.models:
        rows = Rows(name, args, device)
        fp32_rows = {"fp32": {}, "fp32 1 thread": {"threads": 1}, "fp32 channels_last": {"cl": True}}
        for _ in range(args.rounds):
            for label, options in fp32_rows.items():
                rows.measure(label, **options)
        for label in fp32_rows:
            rows.show(label)
        if not args.no_compile:
            for label, options in {"fp32 compile": {}, "fp32 compile + cl": {"cl": True}}.items():
                rows.measure(label, compiled=True, **options)
                rows.show(label)
        for dtype in (torch.bfloat16,) + ((torch.float16,) if device.type == "cuda" else ()):
            tag = hardware.NAMES[dtype]
            rows.measure(tag, dtype, give_up_after=20 * rows.seconds["fp32"])
            rows.show(tag)
            if rows.seconds[tag] < 5 * rows.seconds["fp32"]:  # with an emulated dtype: minutes more to learn nothing
                rows.measure(f"{tag} channels_last", dtype, cl=True)
                rows.show(f"{tag} channels_last")
                if not args.no_compile:  # where the precision is native, compiling may pay more than in fp32
                    rows.measure(f"{tag} compile + cl", dtype, cl=True, compiled=True, eager=f"{tag} channels_last")
                    rows.show(f"{tag} compile + cl")
        label = f"{auto.name} channels_last" if defaults.trainer.channels_last else auto.name
        label = label if label in rows.seconds else auto.name
        # The fastest precision and memory format; compiling is a separate choice (its minute of compile is paid per
        # run, so trainer.compile stays opt-in) and one thread is no choice at all.
        fastest = min((k for k in rows.seconds if "compile" not in k and "thread" not in k), key=rows.seconds.get)
        ratio = rows.seconds[label] / rows.seconds[fastest]
        rows.show(label, f"auto = {label}", f", {ratio:.2f}x the fastest precision ({fastest})")
        table += rows.shown
    results = {"machine": machine(), "setting": setting, "rows": table}
    lines = ["# Training step by precision and kernels", "",
             "Written by `bench/amp_step.py` (do not edit by hand): seconds per training step (forward, DiceLoss, "
             "backward, Adam) of the same weights on the same batch, each row against plain fp32 measured in the same "
             f"run. {setting}.", "", machine_line(results["machine"]), "",
             "| model | setting | s / step | speed vs fp32 | note |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['row']} | {r['seconds']:.3f} | x{r['vs_fp32']:.2f} | {r['note']} |" for r in table]
    print(f"wrote {write('amp_step', results, chr(10).join(lines), args.results)}")


if __name__ == "__main__":
    main()
