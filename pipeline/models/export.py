"""A checkpoint's network as inference runs it, written as ONNX or TorchScript for a fixed window size, and exported
networks run on CPU runtimes (ONNX Runtime, OpenVINO) for the predictor (inference/predictor.py). `python -m
pipeline.export` writes them, or a MONAI bundle (pipeline/models/bundle.py, which builds on this module)."""

import logging
import warnings
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipeline.core.errors import InputError
from pipeline.core.files import atomic
from pipeline.models import adapters

log = logging.getLogger(__name__)

SUFFIX = {"onnx": ".onnx", "torchscript": ".ts"}


def build_model(bundle: dict) -> torch.nn.Module:
    """The checkpoint's network as inference runs it: one full-size class-logits output (adapters.ForInference)."""
    model = instantiate(OmegaConf.create(bundle["config"]).model)
    model.load_state_dict(bundle["state_dict"])
    return adapters.for_inference(model.eval())


def export_model(model: torch.nn.Module, config: dict, fmt: str, path: Path) -> Path:
    """Write `model` for sliding-window use: fixed window size (the roi), dynamic batch (sw_batch_size); atomic."""
    if fmt not in SUFFIX:
        raise InputError(f"format={fmt}: must be onnx, torchscript or bundle")
    example = torch.randn(1, config["data"]["in_channels"], *config["trainer"]["inferer"]["roi_size"])
    # The tracer's warnings (Python control flow fixed at the example's size, instance norm's training flag) hold for
    # a fixed-size window, which is all this file is used for: they would only clutter every inference run.
    with atomic(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", module=r"torch\.onnx")
        if fmt == "onnx":
            # The TorchScript-based exporter: the dynamo one needs onnxscript, which this project does not pin.
            torch.onnx.export(model, (example,), str(tmp), input_names=["image"], output_names=["logits"],
                              opset_version=17, dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                              dynamo=False)
        else:
            torch.jit.save(torch.jit.trace(model, example), str(tmp))
    return path


class CpuRuntimeModel(torch.nn.Module):
    """An exported ONNX network behind the nn.Module call the MONAI inferers expect: float32 arrays in and out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(x.float().cpu().numpy()))


class OnnxRuntimeModel(CpuRuntimeModel):
    """ONNX Runtime's CPU execution provider."""

    def __init__(self, path: str | Path):
        super().__init__()
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.run = lambda array: session.run(None, {"image": array})[0]


class OpenVinoModel(CpuRuntimeModel):
    """OpenVINO's CPU plugin, held at f32: on CPUs with bf16 its default would be bf16, whose label maps differ from
    fp32's. On an AVX2 CPU its fused kernels ran BRATS windows 1.3-1.4x faster than eager torch (bench/infer.py)."""

    def __init__(self, path: str | Path):
        super().__init__()
        import openvino

        compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self.run = lambda array: compiled(array)[0]
