"""The label check per task: a reduced precision's label maps against fp32's, class by class, and both against the
truth, with mirror TTA on (as the recipes predict), into docs/results/precision.{md,json}.

    .venv/bin/python bench/precision.py hippocampus --amp bf16        # bench/auto.py's model, 10 unseen cases
    .venv/bin/python bench/precision.py ibsr --ckpt <run>/checkpoints/last.pt --cases 2

A precision may be a default (`predict.amp=auto`) only where it holds on every task: Dice against fp32 >= 0.999 for
every class, and the task's mean Dice against the truth lower by 0.001 at most. On a CPU without native bf16 (AVX2
only) oneDNN emulates it: the labels are checked, its seconds say nothing of a CPU with AMX.
"""

import json

from pipeline.core import hardware
from pipeline.evaluation.precision import AGREES, TRUTH_DROP, label_check
from pipeline.models import checkpoint

from common import machine, machine_line, write
from tta import task_parser, unseen


def page(rows: dict) -> str:
    lines = ["# The label check of reduced precision", "",
             "Written by `bench/precision.py` (do not edit by hand). Each task's model on cases it never trained "
             "on, mirror TTA on, PyTorch: the reduced precision's label maps against fp32's (Dice per class, pooled "
             f"over the cases; holds from {AGREES}) and both against the truth (mean Dice; may fall by "
             f"{TRUTH_DROP} at most).", "",
             "| task | precision | cases | Dice to fp32, per class | Dice to truth: fp32 / reduced | holds | "
             "s a case: fp32 / reduced | CPU class (threads) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows.values():
        m = r["machine"]
        truth = (f"{r['truth_dice']['fp32']:.4f} / {r['truth_dice'][r['amp']]:.4f}" if r["truth_dice"] else "")
        s = r["seconds_per_case"]
        lines.append(f"| {r['task']} | {r['precision']}{' (emulated)' if r['emulated'] else ''} | {r['cases']} | "
                     f"{', '.join(f'{c} {v:.4f}' for c, v in r['agreement'].items())} | {truth} | "
                     f"{'yes' if r['holds'] else 'no'} | {s['fp32']:.2f} / {s[r['amp']]:.2f} | "
                     f"{m['cpu'].split(': ', 1)[-1]} ({m['threads']}) |")
    lines += ["", *sorted({machine_line(r["machine"]) for r in rows.values()})]
    return "\n".join(lines)


def main() -> None:
    parser = task_parser(__doc__.splitlines()[0], "precision")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16"])
    args = parser.parse_args()
    ckpt, root, cases, _ = unseen(args)
    device = hardware.pick_device("auto")
    emulated = device.type == "cpu" and args.amp == "bf16" and not hardware.cpu_bf16()[0]
    print(f"{args.task}: {ckpt}, {len(cases)} cases, {args.amp}{' (emulated: slow)' if emulated else ''}")
    r = label_check({ckpt: checkpoint.load(ckpt)},
                    [(root / "imagesTr" / f"{c}.nii.gz", root / "labelsTr" / f"{c}.nii.gz") for c in cases],
                    args.amp, tta=True)
    r |= {"task": args.task, "model": str(ckpt), "emulated": emulated, "machine": machine(),
          "device": str(device)}
    path = args.results / "precision.json"
    rows = json.loads(path.read_text()) if path.is_file() else {}
    rows[f"{args.task} {args.amp} {r['device']}"] = r
    print(json.dumps({k: r[k] for k in ("agreement", "truth_dice", "holds", "seconds_per_case")}, indent=1))
    print(f"wrote {write('precision', rows, page(rows), args.results)}")


if __name__ == "__main__":
    main()
