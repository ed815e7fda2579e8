"""amp=auto from the hardware: every answer of the CPU queries (monkeypatched), CUDA, explicit choices, and the
channels_last_3d weights that training uses by default."""

import pytest
import torch
from hydra.utils import instantiate

from pipeline.core import hardware
from pipeline.core.config import compose
from pipeline.core.errors import InputError

CPU = torch.device("cpu")


@pytest.fixture
def cpu(monkeypatch):
    """Set what the CPU queries answer: cpu(arch, amx=, avx512_bf16=, aten=, mkldnn_bf16=)."""

    def make(arch="x86_64", amx=False, avx512_bf16=False, aten="AVX2", mkldnn_bf16=False):
        monkeypatch.setattr(hardware.platform, "machine", lambda: arch)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: aten)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: mkldnn_bf16)
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)

    return make


def test_avx2_cpu_trains_and_infers_in_fp32_and_says_why(cpu):
    cpu(aten="AVX2")
    chosen = hardware.resolve("auto", CPU)
    assert chosen.dtype is None and chosen.name == "fp32"
    assert str(chosen) == "amp: fp32 (CPU has AVX2, no native bf16)"
    assert hardware.resolve("auto", CPU, inference=True).dtype is None


def test_avx512_without_bf16_is_not_fooled_by_onednn_emulation(cpu):
    # Skylake/Ice Lake: oneDNN 'supports' bf16 there (by emulation), but the CPU has no bf16 instructions.
    cpu(aten="AVX512", mkldnn_bf16=True)
    chosen = hardware.resolve("auto", CPU)
    assert chosen.dtype is None and chosen.reason == "CPU has AVX512, no native bf16"


@pytest.mark.parametrize("flags,has", [({"avx512_bf16": True}, "AVX512-BF16"),
                                       ({"amx": True, "avx512_bf16": True}, "AMX")])
def test_native_bf16_cpu_trains_in_bf16_but_infers_in_fp32(cpu, flags, has):
    cpu(aten="AVX512", mkldnn_bf16=True, **flags)
    train = hardware.resolve("auto", CPU)
    assert train.dtype == torch.bfloat16 and train.reason == f"CPU has {has}"
    infer = hardware.resolve(True, CPU, inference=True)
    assert infer.dtype is None and infer.reason.startswith(f"CPU has {has}; inference keeps fp32")


@pytest.mark.parametrize("var", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
def test_onednn_isa_limit_below_bf16_means_fp32(cpu, monkeypatch, var):
    cpu(aten="AVX512", avx512_bf16=True)
    monkeypatch.setenv(var, "avx2")
    chosen = hardware.resolve("auto", CPU)
    assert (chosen.dtype is None
            and chosen.reason == "CPU has AVX512-BF16, but ONEDNN_MAX_CPU_ISA=avx2 keeps oneDNN from it")
    monkeypatch.setenv(var, "AVX512_CORE_AMX")  # a limit at or above bf16 changes nothing
    assert hardware.resolve("auto", CPU).dtype == torch.bfloat16


def test_aten_capability_limit_means_fp32(cpu):
    cpu(aten="AVX2", avx512_bf16=True)  # ATEN_CPU_CAPABILITY=avx2 on an AVX512-BF16 CPU
    chosen = hardware.resolve("auto", CPU)
    assert chosen.dtype is None and "ATen runs its AVX2 kernels" in chosen.reason


@pytest.mark.parametrize("bf16,dtype", [(True, torch.bfloat16), (False, None)])
def test_arm_cpu_follows_its_bf16_extension(cpu, bf16, dtype):
    cpu(arch="aarch64", aten="DEFAULT", mkldnn_bf16=bf16)
    assert hardware.resolve("auto", CPU).dtype == dtype


def test_explicit_bf16_on_an_emulating_cpu_runs_after_one_warning_line(cpu, capsys):
    cpu(aten="AVX2")
    chosen = hardware.resolve("bf16", CPU)
    assert chosen.dtype == torch.bfloat16
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: amp=bf16") and "30-90x slower than fp32" in err[0]
    cpu(aten="AVX512", amx=True)
    hardware.resolve("bf16", CPU)
    assert capsys.readouterr().err == ""  # native: nothing to warn about


@pytest.mark.parametrize("amp", [False, "false", "fp32", None])
def test_amp_off_is_fp32_everywhere(amp):
    assert hardware.resolve(amp, CPU).dtype is None
    assert hardware.resolve(amp, torch.device("cuda")).dtype is None


def test_cuda_auto_is_fp16_with_a_grad_scaler():
    chosen = hardware.resolve("auto", torch.device("cuda"))  # no GPU needed: the rule does not ask the device
    assert chosen.dtype == torch.float16 and "GradScaler" in chosen.reason
    assert hardware.resolve("auto", torch.device("cuda"), inference=True).dtype == torch.float16


def test_unknown_amp_value_is_a_one_line_error():
    with pytest.raises(InputError, match=r"^amp=fp8: must be auto, false \(fp32\), bf16 or fp16$"):
        hardware.resolve("fp8", CPU)


def test_cpu_class_names_the_instruction_sets():
    text = hardware.cpu_class()
    assert torch.backends.cpu.get_cpu_capability() in text and f"{torch.get_num_threads()} threads" in text


def test_channels_last_converts_3d_weights_only_and_keeps_outputs_and_checkpoints():
    cfg = compose("train", ["data.root=unused", "+data.num_classes=3", "+data.in_channels=1",
                            "model.channels=[8,16,32]", "model.strides=[2,2]"])
    torch.manual_seed(0)
    plain = instantiate(cfg.model).eval()
    fast = instantiate(cfg.model).eval()
    fast.load_state_dict(plain.state_dict())
    hardware.channels_last(fast)
    convs = [p for p in fast.parameters() if p.dim() == 5]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in convs)
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=1e-4)
    # A state_dict saved from channels-last weights loads into a plain network with equal values.
    fresh = instantiate(cfg.model)
    fresh.load_state_dict(fast.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), plain.state_dict().values()))
    flat = torch.nn.Conv2d(1, 4, 3)  # 4-D weights: channels_last_3d does not apply
    hardware.channels_last(flat)
    assert flat.weight.is_contiguous()
