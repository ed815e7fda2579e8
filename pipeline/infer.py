"""Inference entry point: `python -m pipeline.infer ckpt=best.pt input=<file or folder> output=<folder>`.

Each volume goes through the checkpoint's own preprocessing, a sliding-window pass, and MONAI's inverse of the
preprocessing, so the label map lands on the input's exact grid (shape, affine, orientation).
"""

import os
from pathlib import Path

import hydra
import nibabel as nib
import numpy as np
import torch
from hydra.utils import instantiate
from monai.transforms import Compose, Invertd
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from pipeline import checkpoint, engine
from pipeline.data.transforms import preprocess
from pipeline.errors import InputError, exit_on_input_error

NIFTI = (".nii", ".nii.gz")


def list_inputs(path: str | Path) -> list[Path]:
    """One NIfTI file, or every NIfTI file in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith(NIFTI) and not p.name.startswith("."))
        if not files:
            raise InputError(f"{path}: folder holds no .nii or .nii.gz files")
        return files
    if not path.exists():
        raise InputError(f"{path}: input not found")
    if not path.name.endswith(NIFTI):
        raise InputError(f"{path}: not a NIfTI file (.nii or .nii.gz)")
    return [path]


def save_label_map(labels: np.ndarray, reference: nib.Nifti1Image, path: Path) -> None:
    """Write labels on the reference's grid (its affine, qform/sform codes and units), atomically."""
    dtype = np.uint8 if labels.max(initial=0) <= np.iinfo(np.uint8).max else np.int16
    image = nib.Nifti1Image(labels.astype(dtype), reference.affine)
    header = reference.header
    image.header.set_qform(reference.affine, code=int(header["qform_code"]) or 1)
    image.header.set_sform(reference.affine, code=int(header["sform_code"]) or 1)
    image.header.set_xyzt_units(*header.get_xyzt_units())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{''.join(path.suffixes[-2:])}")
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Predictor:
    """Rebuilds model, preprocessing and inferer from a checkpoint; turns a NIfTI path into a label map array."""

    def __init__(self, bundle: dict, device: str = "auto", amp="auto", overlap: float | None = None, sw_batch_size: int | None = None):
        cfg = OmegaConf.create(bundle["config"])
        self.device = engine.pick_device(device)
        self.dtype = engine.amp_dtype(amp, self.device)
        self.model = instantiate(cfg.model)
        self.model.load_state_dict(bundle["state_dict"])
        self.model.to(self.device).eval()
        window = {k: v for k, v in {"overlap": overlap, "sw_batch_size": sw_batch_size}.items() if v is not None}
        self.inferer = instantiate(cfg.trainer.inferer, **window)
        self.preprocess = Compose(preprocess(cfg))
        # Invert orientation/resampling on the logits (interpolated like the image), then take the argmax.
        self.invert = Invertd(keys="pred", transform=self.preprocess, orig_keys="image", nearest_interp=False)

    def __call__(self, path: Path) -> np.ndarray:
        data = self.preprocess({"image": str(path)})
        logits = engine.predict(self.model, data["image"][None], self.inferer, self.device, self.dtype)[0].cpu()
        data["pred"] = logits
        pred = self.invert(data)["pred"]
        return torch.argmax(pred, dim=0).numpy()


def infer(ckpt: str | Path, input: str | Path, output: str | Path, device="auto", amp="auto", overlap=None, sw_batch_size=None) -> list[Path]:
    """Predict every input volume into `output/<same file name>`; returns the written paths."""
    files = list_inputs(input)
    out_dir = Path(output)
    targets = [out_dir / f.name for f in files]
    for src, dst in zip(files, targets):
        if dst.resolve() == src.resolve():
            raise InputError(f"{src}: output would overwrite the input; choose another output= folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: output exists and is not a folder")
    references = []
    for f in files:  # read every header first: a bad file fails the run before anything is written
        try:
            references.append(nib.load(f))
        except Exception as err:
            raise InputError(f"{f}: not a readable NIfTI ({err})") from None
    predictor = Predictor(checkpoint.load(ckpt), device, amp, overlap, sw_batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    for src, dst, ref in zip(tqdm(files, desc="infer", unit="volume"), targets, references):
        labels = predictor(src)
        if labels.shape != ref.shape[:3]:
            raise RuntimeError(f"{src}: prediction shape {labels.shape} does not match the input's {ref.shape[:3]}")
        save_label_map(labels, ref, dst)
    return targets


@hydra.main(config_path="../conf", config_name="infer", version_base="1.3")
@exit_on_input_error
def main(cfg: DictConfig) -> None:
    written = infer(cfg.ckpt, cfg.input, cfg.output, cfg.device, cfg.amp, cfg.overlap, cfg.sw_batch_size)
    print(f"wrote {len(written)} label map(s) to {Path(cfg.output).resolve()}")


if __name__ == "__main__":
    main()
