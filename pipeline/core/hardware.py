"""The machine a run is on and the fastest way to run there: precision (what `amp=auto` means, and why), memory
format, and the CPU's description that goes beside every speed figure. Chosen from the hardware, never assumed.

On a CPU, bf16 autocast is about 2x faster than fp32 where the CPU has bf16 instructions (AVX512-BF16, AMX, Arm BF16)
and 30-90x slower where it has not (oneDNN then emulates bf16 with AVX2: bench/amp_step.py measured x0.01-x0.03).
So the choice asks the CPU. It asks cpuinfo (torch.cpu._is_avx512_bf16_supported / _is_amx_tile_supported), which
reads the same CPUID bits oneDNN dispatches on, rather than `torch.ops.mkldnn._is_mkldnn_bf16_supported()`: that one
says True on every AVX-512 CPU, Skylake included, where oneDNN supports bf16 only by emulation. No micro-benchmark is
needed then, and none runs (it would cost seconds where bf16 is emulated). The environment variables that keep torch
from those instructions (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY) are honoured: the answer is then fp32, and says why.
"""

import logging
import os
import platform
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.errors import InputError

log = logging.getLogger(__name__)

NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPES = {name: dtype for dtype, name in NAMES.items()}
# oneDNN ISA levels below the first with native bf16 (AVX512_CORE_BF16); ONEDNN_MAX_CPU_ISA at one of these keeps
# oneDNN's convolutions and matmuls from bf16 instructions the CPU may have.
ONEDNN_BELOW_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None: plain fp32) and the reason it was chosen, in words."""

    dtype: torch.dtype | None
    reason: str

    @property
    def name(self) -> str:
        return NAMES[self.dtype]

    def __str__(self) -> str:
        return f"amp: {self.name} ({self.reason})"

    def record(self) -> dict:
        """Plain data for checkpoints and run tags."""
        return {"amp": self.name, "reason": self.reason}


def pick_device(name: str = "auto") -> torch.device:
    """trainer.device, predict.device: `auto` is the GPU where torch sees one, else the CPU; other names as given."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast at `dtype`, or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU runs bf16 convolutions natively, and the evidence, in words."""
    arch = platform.machine().lower()
    if arch in ("x86_64", "amd64"):
        capability = torch.backends.cpu.get_cpu_capability()  # ATen's kernels: AVX512, AVX2, ... (ATEN_CPU_CAPABILITY)
        if torch.cpu._is_amx_tile_supported():
            has = "AMX"
        elif torch.cpu._is_avx512_bf16_supported():
            has = "AVX512-BF16"
        else:
            return False, f"CPU has {capability}, no native bf16"
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
        if isa and isa.strip().upper() in ONEDNN_BELOW_BF16:
            return False, f"CPU has {has}, but ONEDNN_MAX_CPU_ISA={isa} keeps oneDNN from it"
        if not capability.startswith("AVX512"):
            return False, f"CPU has {has}, but ATen runs its {capability} kernels (ATEN_CPU_CAPABILITY)"
        return True, f"CPU has {has}"
    if arch in ("aarch64", "arm64"):
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # on Arm this is the BF16 instruction extension itself
            return True, "Arm CPU with BF16 instructions"
        return False, "Arm CPU without BF16 instructions"
    return False, f"{arch} CPU, no native bf16 known"


def requested(amp) -> str:
    """The config's amp value as auto | fp32 | bf16 | fp16."""
    if amp in (False, None, "false", "fp32", "no"):
        return "fp32"
    if amp in (True, "auto", "true"):
        return "auto"
    if amp in ("bf16", "fp16"):
        return amp
    raise InputError(f"amp={amp}: must be auto, false (fp32), bf16 or fp16")


def resolve(amp, device: torch.device, *, inference: bool = False) -> Precision:
    """The precision for `amp` (auto | false | bf16 | fp16) on `device`, with its reason. `inference`: whole-volume
    prediction, where `auto` keeps fp32 on a CPU (bf16's label maps against fp32's: bench/precision.py).
    An explicit bf16 or fp16 where the hardware only emulates it is kept, after a one-line warning."""
    want = requested(amp)
    if want == "fp32":
        return Precision(None, "amp=false")
    if device.type == "cuda":
        # fp16 on every GPU: as fast as bf16 on the tensor cores of Ampere and later, native on older GPUs (V100, T4)
        # where bf16 is not, and nnU-Net's choice; training pairs it with a GradScaler against underflow.
        if want == "auto":
            return Precision(torch.float16, "CUDA: fp16 autocast" + ("" if inference else " with a GradScaler"))
        if want == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            _warn(f"amp=bf16 on {torch.cuda.get_device_name(device)}, which has no native bf16: "
                  "expect it slower than fp16")
        return Precision(DTYPES[want], f"amp={want} on CUDA")
    if device.type != "cpu":
        return Precision(None if want == "auto" else DTYPES[want], f"amp={want} on {device.type}")
    native, why = cpu_bf16()
    if want == "auto":
        if not native:
            return Precision(None, why)
        if inference:
            # the label check (bench/precision.py) keeps a precision as a default only where it held on every task
            return Precision(None, f"{why}; inference keeps fp32: bf16 has not held the label check on every task "
                                   "(docs/results/precision.md; amp=bf16 opts in)")
        return Precision(torch.bfloat16, why)
    if want == "bf16":
        if not native:
            _warn(f"amp=bf16 on a CPU without native bf16 ({why}): oneDNN emulates it, so expect it 30-90x slower "
                  f"than fp32 (bench/amp_step.py measures it); amp=auto picks fp32 here")
        return Precision(torch.bfloat16, f"amp=bf16; {why}")
    if not torch.cpu._is_amx_fp16_supported():
        _warn("amp=fp16 on a CPU without AMX-FP16: oneDNN emulates fp16, so expect it slower than fp32")
    return Precision(torch.float16, "amp=fp16 on the CPU")


def _warn(message: str) -> None:
    log.warning(message)


def cpu_class() -> str:
    """The CPU and the instruction sets that decide speed, e.g. 'AMD EPYC, 2 threads: AVX2 (no AVX512-BF16, no AMX)'."""
    path = Path("/proc/cpuinfo")
    info = dict(line.split(":", 1) for line in (path.read_text().splitlines() if path.exists() else []) if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}  # the last processor's entries: all cores are alike
    model, flags = (info.get("model name") or platform.processor() or platform.machine(),
                    set(info.get("flags", "").split()))
    named = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX", "avx512f": "AVX-512", "amx_fp16": "AMX-FP16"}
    has = [v for k, v in named.items() if k in flags]
    lacks = [f"no {v}" for k, v in named.items() if k not in flags and v in ("AVX512-BF16", "AMX")]
    detail = ", ".join(has + lacks) if flags else cpu_bf16()[1]
    return f"{model}, {torch.get_num_threads()} threads: {torch.backends.cpu.get_cpu_capability()} ({detail})"


def describe(device: torch.device) -> str:
    """The line benchmarks print first: the CPU class, or the GPU's name."""
    return f"CPU: {cpu_class()}" if device.type == "cpu" else f"device: {torch.cuda.get_device_name(device)}"


def channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its 5-D (3D convolution) weights in channels_last_3d, in place. oneDNN then picks its channels-last
    kernels: training steps x1.1-1.3 faster than on NCDHW tensors on an AVX2 CPU (bench/amp_step.py);
    inputs need no conversion, the convolution follows the weight's format. 2-D networks are left as they are."""
    for p in model.parameters():
        if p.dim() == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    return model
