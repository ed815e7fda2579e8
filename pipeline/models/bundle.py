"""A checkpoint as a MONAI bundle (`python -m pipeline.export ckpt=best.pt format=bundle`): the folder MONAI's own tools
read (`monai.bundle run`, MONAI Label, MONAI Deploy), with nothing of this package needed to run it.

    <bundle>/configs/metadata.json    the bundle specification's metadata (versions, task, tensor formats, classes)
    <bundle>/configs/inference.json   the checkpoint's preprocessing, sliding window and inversion as MONAI components
    <bundle>/models/model.ts          the network as TorchScript (any network, ours included)
    <bundle>/models/model.pt          its state dict; `network_def` rebuilds it where the network is MONAI's own
    <bundle>/docs/README.md           what it does and how to run it

The transforms are the checkpoint's own `_target_` entries (conf/transforms: MONAI transforms throughout), with the
label key dropped; MONAI's bundle config reads Hydra's `_target_` syntax as it is.
"""

import json
from pathlib import Path

import ignite
import monai
import nibabel
import numpy as np
import torch

from pipeline import __version__
from pipeline.core.files import atomic
from pipeline.data.transforms import preprocessing_stages
from pipeline.models.export import export_model

# The official schema of bundle metadata, downloaded by `python -m monai.bundle verify_metadata`.
SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
PER_KEY = ("mode", "padding_mode", "align_corners", "dtype")  # per-key arguments of dictionary transforms


def image_only(stage: dict) -> dict:
    """A preprocessing stage for the image alone: keys [image], and per-key arguments (Spacingd's [bilinear,
    nearest]) cut to the image's."""
    keys = stage.get("keys")
    keys = [keys] if isinstance(keys, str) else list(keys or [])
    out = dict(stage)
    if keys:
        out["keys"] = ["image"]
        for name in PER_KEY:
            if isinstance(out.get(name), list) and len(out[name]) == len(keys):
                out[name] = out[name][keys.index("image")]
    return out


def preprocessing(config: dict) -> list[dict]:
    """The checkpoint's load -> orient -> (resample) -> normalize, as training and pipeline.infer ran them."""
    return [image_only(config["transforms"][s]) for s in preprocessing_stages(config)]


def inference_config(config: dict) -> dict:
    """configs/inference.json: `monai.bundle run` predicts every image in dataset_dir into output_dir."""
    window = config["trainer"]["inferer"]
    return {
        "imports": ["$import glob", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "dataset_dir": "input",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$sorted(glob.glob(@dataset_dir + '/*.nii*'))",
        "network": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device).eval()",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing(config)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": window["roi_size"],
                    "sw_batch_size": window["sw_batch_size"], "overlap": window["overlap"],
                    "mode": window.get("mode", "constant")},
        # as pipeline.infer: class probabilities mapped back onto the input grid, then the most probable class
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False, "print_log": False},
        ]},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing"},
        "run": ["$@evaluator.run()"],
    }


def metadata(config: dict) -> dict:
    """configs/metadata.json, with the keys the MONAI bundle specification makes mandatory."""
    data, window = config["data"], config["trainer"]["inferer"]["roi_size"]
    ct = "ScaleIntensityRange" in config["transforms"]["normalize"]["_target_"]
    names = data["class_names"]
    return {
        "schema": SCHEMA,
        "name": str(data["name"]),
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by pipeline {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": nibabel.__version__, "pytorch-ignite": ignite.__version__},
        "optional_packages_version": {},
        "task": f"{data['name']}: segmentation of {', '.join(names[1:])}",
        "description": (f"A {config['model']['_target_'].rsplit('.', 1)[-1]} trained by pipeline {__version__} "
                        f"(sliding window {window}, {len(names) - 1} foreground classes)."),
        "authors": "pipeline",
        "copyright": "the model's authors",
        "data_source": str(data["root"]),
        "intended_use": "research; not for diagnostic use",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield" if ct else "magnitude", "modality": "CT" if ct else "n/a",
                "num_channels": data["in_channels"], "spatial_shape": list(window), "dtype": "float32",
                "value_range": [], "is_patch_data": True,
                "channel_def": {str(i): f"channel {i}" for i in range(data["in_channels"])}}},
            "outputs": {"pred": {
                "type": "image", "format": "labels", "num_channels": len(names), "spatial_shape": list(window),
                "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": {str(i): n for i, n in enumerate(names)}}},
        },
    }


def readme(config: dict) -> str:
    names = config["data"]["class_names"]
    return f"""# {config['data']['name']}

Exported by pipeline {__version__} from a training run; classes: {', '.join(f'{i} {n}' for i, n in enumerate(names))}.

    python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
        --dataset_dir <folder of .nii.gz> --output_dir <folder>

writes `<image>_seg.nii.gz` per image on the image's own grid. `models/model.ts` is the network as TorchScript
(a fixed window of {config['trainer']['inferer']['roi_size']} voxels, any batch size); `models/model.pt` its weights.
"""


def write_json(path: Path, content: dict) -> None:
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2))


def export_bundle(model: torch.nn.Module, state_dict: dict, config: dict, folder: Path) -> Path:
    """Write the bundle folder; every file atomically."""
    folder = Path(folder)
    export_model(model, config, "torchscript", folder / "models" / "model.ts")
    with atomic(folder / "models" / "model.pt") as tmp:
        torch.save(state_dict, tmp)
    inference = inference_config(config)
    if config["model"]["_target_"].startswith("monai."):  # MONAI Label and Deploy can rebuild it from model.pt
        inference["network_def"] = config["model"]
    write_json(folder / "configs" / "inference.json", inference)
    write_json(folder / "configs" / "metadata.json", metadata(config))
    with atomic(folder / "docs" / "README.md") as tmp:
        tmp.write_text(readme(config))
    return folder
