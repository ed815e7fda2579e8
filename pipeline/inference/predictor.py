"""Inference as a library (the `pipeline.infer` and `pipeline.evaluate` entry points call it): checkpoints in, label
maps out.

Each volume goes through the checkpoint's own preprocessing, a sliding-window pass (optionally mirrored for TTA and
averaged over several checkpoints), and MONAI's inverse of the preprocessing, so the label map lands on the input's
exact grid (shape, affine, orientation). Inputs: NIfTI, NRRD, MHA, DICOM series folders (see pipeline/data/io.py).
"""

import importlib.util
import itertools
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from monai.data import MetaTensor
from monai.transforms import Compose, FillHoles, Invertd, KeepLargestConnectedComponent, RemoveSmallObjects
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm.auto import tqdm

from pipeline.core import hardware
from pipeline.core.errors import InputError, RunStopped
from pipeline.core.files import StorageError, atomic
from pipeline.core.interrupts import Interrupts
from pipeline.core.rundir import RunDir
from pipeline.data.io import Reference, Volume, find_inputs, label_dtype, ras_spacing
from pipeline.data.transforms import preprocess, preprocessing_config
from pipeline.models import checkpoint
from pipeline.models.adapters import ForInference, for_inference
from pipeline.models.export import OnnxRuntimeModel, OpenVinoModel, build_model, export_model

log = logging.getLogger(__name__)

# Networks exported to ONNX and run by another CPU runtime; backend=auto picks OpenVINO on a CPU in fp32.
EXPORTED = {"onnxruntime": OnnxRuntimeModel, "openvino": OpenVinoModel}
BACKENDS = ("auto", "torch", *EXPORTED)
# nifti: <name>.nii.gz; input: the input's own format (a DICOM-SEG beside the NIfTI for a DICOM series);
# dicom-seg: a DICOM-SEG beside the NIfTI for a DICOM series, NIfTI for the rest
FORMATS = ("nifti", "input", "dicom-seg")
RECORD = "predicted_with.json"  # beside the predictions: checkpoints, precision, backend, mirrors, windows, CPU


def checkpoints(ckpt, cache: Path | None = None, final: bool = False) -> list[Path]:
    """One checkpoint, a list of them, or a folder of *.pt (an ensemble, e.g. the k folds; from a folder of runs each
    run's RunDir.model(final): best.pt, a `data.fold=all` run's last.pt, every run's last.pt if `final`). Any of them
    may be a registered model version, `models:/<name>/<version>` (or `/latest`, `@<alias>`), fetched from the MLflow
    registry at MLFLOW_TRACKING_URI (default: the project's sqlite store) into `cache` (default outputs/registry)."""
    paths = []
    for p in ckpt if isinstance(ckpt, (list, tuple, ListConfig)) else [ckpt]:
        if str(p).startswith("models:/"):
            from pipeline.tracking.runs import download_registered  # imports mlflow: only when asked for

            paths += download_registered(str(p), cache)
        else:
            paths.append(Path(p))
    if len(paths) == 1 and paths[0].is_dir():
        # a folder of checkpoints, or of runs (a multirun's: the k folds, or data.fold=all models with several seeds)
        paths = sorted(paths[0].glob("*.pt")) or [run.model(final) for run in RunDir.runs_in(paths[0])]
        if not paths:
            raise InputError(f"{ckpt}: folder holds no .pt checkpoints, nor runs with checkpoints/best.pt")
    return paths


@dataclass(frozen=True, kw_only=True)
class PredictOptions:
    """How checkpoints predict: the keys of conf/predict/default.yaml, which pipeline.infer and pipeline.evaluate
    share (README "Inference" explains each)."""

    device: str = "auto"
    amp: str | bool = "auto"
    backend: str = "auto"
    compile: bool = False
    channels_last: bool = True
    overlap: float | None = None  # None: the checkpoint's sliding-window settings
    sw_batch_size: int | None = None
    stitch_device: str | None = None
    tta: bool = False
    tta_axes: tuple[int, ...] | None = None  # None: the axes every member's training mirrored (mirrored_axes)
    uncertainty: str | None = None
    postprocess: dict = field(default_factory=dict)  # keyword arguments of postprocess()

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "PredictOptions":
        """The options a config gives (the others keep their defaults)."""
        given = {f.name: OmegaConf.to_object(cfg[f.name]) if OmegaConf.is_config(cfg[f.name]) else cfg[f.name]
                 for f in fields(cls) if f.name in cfg}
        return cls(**given | ({"tta_axes": tuple(given["tta_axes"])} if given.get("tta_axes") is not None else {}))


@torch.no_grad()
def predict(model, image: torch.Tensor, inferer, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Float32 class logits (B, K, ...) for whole volumes, by the (sliding-window) inferer."""
    model.eval()
    with hardware.autocast(device, dtype):
        return inferer(image.to(device), for_inference(model)).float()


class MirrorAveraged(ForInference):
    """A network's softmax averaged over mirrors of each window: nnU-Net's test-time mirroring done inside the sliding
    window, so that each window is cut, weighted and stitched once for all its mirrors (not once per mirror, as a
    mirrored whole volume is) and its mirrored copies pass the network `batch` at a time. Returns (B, K) mean
    probabilities, followed with `squares` by their (B, K) mean squares (the spread across mirrors)."""

    def __init__(self, net: torch.nn.Module, flips: list[list[int]], batch: int, squares: bool = False):
        super().__init__(net)
        self.flips, self.batch, self.squares = flips, max(1, batch), squares

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        views = torch.cat([torch.flip(x, [d + 2 for d in f]) if f else x for f in self.flips])  # mirror by mirror
        total = squares = None
        for start in range(0, len(views), self.batch):
            probs = torch.softmax(super().forward(views[start:start + self.batch]).float(), 1)
            if total is None:  # running sums: a network of many classes holds no stack of every mirror's output
                total = probs.new_zeros((n, *probs.shape[1:]))
                squares = torch.zeros_like(total) if self.squares else None
            for k, p in enumerate(probs, start):  # view k: mirror k // n of window k % n
                p = torch.flip(p, [d + 1 for d in self.flips[k // n]])
                total[k % n] += p
                if squares is not None:
                    squares[k % n] += p.square()
        total /= len(self.flips)
        return torch.cat([total, squares / len(self.flips)], 1) if squares is not None else total


def mirrors(axes) -> list[list[int]]:
    """Every subset of `axes`, the empty one (no mirror) first: the mirrors test-time augmentation averages."""
    return [list(c) for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def mirrored_axes(configs) -> tuple[int, ...]:
    """The spatial axes that every one of these training configs mirrors (a RandFlipd with prob > 0): test-time
    augmentation mirrors only these, as nnU-Net keeps its training's mirror axes for inference. A network never shown
    a front-back mirror (the hippocampus sprint recipe: there it swaps anterior and posterior) predicts it wrongly."""
    common = {0, 1, 2}
    for config in configs:
        axes = set()
        for t in (config.get("transforms", {}).get("augment") or {}).values():
            # RandFlipd's own default probability is 0.1
            if t and str(t.get("_target_", "")).endswith("RandFlipd") and t.get("prob", 0.1) > 0:
                given = t.get("spatial_axis")
                axes |= {0, 1, 2} if given is None else set(given if isinstance(given, (list, tuple)) else [given])
        common &= axes
    return tuple(sorted(common))


def shared_preprocessing(bundles: dict[Path, dict]) -> dict:
    """The config of the first checkpoint, once every member is known to preprocess its input the same way."""
    first_path, first = next(iter(bundles.items()))
    for path, bundle in bundles.items():  # ensemble members must see the same input
        if preprocessing_config(bundle["config"]) != preprocessing_config(first["config"]):
            raise InputError(f"{path}: preprocessing differs from {first_path}'s; ensemble members must share it")
    return first["config"]


class Predictor:
    """Rebuilds models, preprocessing and inferers from checkpoints; turns one volume into probabilities on its grid."""

    def __init__(self, bundles: dict[Path, dict], options: PredictOptions | None = None, **changes):
        """`changes`: PredictOptions fields that differ from `options` (default PredictOptions())."""
        o = self.options = replace(options or PredictOptions(), **changes)
        cfg = OmegaConf.create(shared_preprocessing(bundles))
        self.num_classes, self.in_channels = cfg.data.num_classes, cfg.data.in_channels
        self.class_names = list(cfg.data.class_names)[: self.num_classes]  # DICOM-SEG segment labels
        self.device = hardware.pick_device(o.device)
        # amp=auto keeps fp32 on the CPU: bf16, where the CPU has it, is about 2x faster (bench/infer.py) but has not
        # held the label check on every task (bench/precision.py: Dice >= 0.999 per class against fp32's labels).
        self.precision = hardware.resolve(o.amp, self.device, inference=True)
        self.backend = self.pick_backend(o.backend, o.compile)
        self.dtype = self.precision.dtype
        self.members, self.paths = self.load_members(bundles), list(bundles)
        # nnU-Net-style mirroring: every subset of the chosen axes, the unflipped pass included
        axes = self.tta_axes(bundles) if o.tta else ()
        self.flips = mirrors(axes)
        self.uncertainty = o.uncertainty
        self.preprocess = Compose(preprocess(cfg))
        self.resampled = cfg.data.spacing is not None
        # Invert orientation/resampling on probabilities (interpolated like the image), then take the argmax.
        self.invert = Invertd(keys="pred", transform=self.preprocess, orig_keys="image", nearest_interp=False)

    def pick_backend(self, backend: str, compile: bool) -> str:
        """backend=auto: the fastest path whose labels match fp32's (bench/infer.py); compile=true asks for torch.
        A CPU runtime moves the model to the CPU at fp32. Sets backend_why."""
        if backend not in BACKENDS:
            raise InputError(f"backend={backend}: must be one of {', '.join(BACKENDS)}")
        self.backend_why = f"backend={backend}"
        if backend == "auto":
            cpu_fp32 = self.device.type == "cpu" and self.precision.dtype is None and not compile
            openvino = importlib.util.find_spec("openvino") is not None
            backend = "openvino" if cpu_fp32 and openvino else "torch"
            self.backend_why = ("auto: OpenVINO's fused CPU kernels, fp32's labels" if backend == "openvino" else
                                "auto: " + ("compile=true" if compile else "not an fp32 CPU path" if not cpu_fp32
                                            else "no openvino installed"))
        if backend in EXPORTED:  # CPU runtimes, run at fp32
            self.device = torch.device("cpu")
            if self.precision.dtype is not None:
                self.precision = hardware.Precision(None, f"{backend} runs fp32 on the CPU")
        return backend

    def record(self) -> dict:
        """How this predictor predicts: logged, and written beside its predictions (pipeline.infer's
        predicted_with.json) so that a label map says which path made it."""
        inferer = self.members[0][1]
        return {"checkpoints": [str(p) for p in self.paths], "device": str(self.device),
                "precision": self.precision.name, "precision_why": self.precision.reason, "backend": self.backend,
                "backend_why": self.backend_why, "tta_mirrors": self.flips, "overlap": inferer.overlap,
                "blending": str(inferer.mode), "sw_batch_size": inferer.sw_batch_size, "cpu": hardware.cpu_class(),
                "torch": torch.__version__}

    def __str__(self) -> str:
        r = self.record()
        tta = f"TTA {len(self.flips)} mirrors a window" if self.flips != [[]] else "no TTA"
        return (f"predict: {r['precision']} ({r['precision_why']}); backend {r['backend']} ({r['backend_why']}); "
                f"{tta}; overlap {r['overlap']}, {r['blending']} blending")

    def load_members(self, bundles: dict[Path, dict]) -> list[tuple]:
        """(network on its backend, sliding-window inferer) per checkpoint."""
        o, members = self.options, []
        window = {k: v for k, v in {"overlap": o.overlap, "sw_batch_size": o.sw_batch_size,
                                    "device": o.stitch_device}.items() if v is not None}
        # An exported network is read into its runtime's memory when loaded: the ONNX files need not outlive this.
        with tempfile.TemporaryDirectory(prefix="pipeline-onnx-") as onnx_dir:
            for i, bundle in enumerate(bundles.values()):
                model = build_model(bundle).to(self.device).eval()
                if self.backend in EXPORTED:
                    model = EXPORTED[self.backend](export_model(model, bundle["config"], "onnx",
                                                                Path(onnx_dir) / f"{i}.onnx"))
                elif o.compile:
                    # Inductor with frozen weights (constant-folded, prepacked for oneDNN): about 2x faster per fp32
                    # window on a CPU after a one-off compile of 5-10 s, so it pays on folder runs. Windows share one
                    # shape. Imported here: Inductor adds ~2 s to every start of this command otherwise.
                    import torch._inductor.config as inductor_config

                    inductor_config.freezing = True
                    model = torch.compile(model, dynamic=False)
                elif o.channels_last:  # eager torch; Inductor picks its own layouts
                    hardware.channels_last(model)
                members.append((model, instantiate(OmegaConf.create(bundle["config"]).trainer.inferer, **window)))
        return members

    def tta_axes(self, bundles: dict[Path, dict]) -> tuple:
        """tta_axes, or the axes the checkpoints' training mirrored."""
        o = self.options
        axes = o.tta_axes if o.tta_axes is not None else mirrored_axes(b["config"] for b in bundles.values())
        if not axes:
            log.warning("tta=true: the checkpoints' training mirrored no axis, so nothing is mirrored (tta_axes= "
                        "names axes)")
        return axes

    def __call__(self, nifti_path: Path, *, probabilities: bool = False,
                 source: Path | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(labels (x, y, z), probabilities (K, x, y, z) or None, uncertainty (x, y, z) or None), on the input grid.
        `source`: the file errors name (default nifti_path)."""
        data = self.preprocess({"image": str(nifti_path)})
        image = data["image"][None]
        # resampled only where the input's grid is not the target one already (MONAI leaves that one as it is)
        grid = ras_spacing(np.asarray(data["image"].meta["original_affine"]))
        resampled = self.resampled and not np.allclose(grid, data["image"].pixdim.numpy(), atol=1e-3)
        # The one input fault that shows only against the model; the model's own errors (out of memory) propagate.
        if (channels := image.shape[1]) != self.in_channels:
            raise InputError(f"{source or nifti_path}: {channels} image channel{'s' * (channels != 1)}; "
                             f"the model takes {self.in_channels}")
        # Running sums rather than a stack of every member's output: a large volume holds only two copies.
        total, squares, variance = None, None, self.uncertainty == "variance"
        mirrored = self.flips != [[]]  # tta (or any mirror set a caller gives)
        # One pass and labels only: the argmax of the logits is the answer; a softmax would change nothing.
        logits_will_do = len(self.members) == 1 and not (mirrored or probabilities or self.uncertainty or resampled)
        for model, inferer in self.members:
            if mirrored:  # the window's mirrors averaged inside the sliding window, sw_batch_size views a call
                model = MirrorAveraged(model, self.flips, inferer.sw_batch_size, squares=variance)
            # a plain tensor on the CPU: MetaTensor bookkeeping costs here
            out = torch.as_tensor(predict(model, image, inferer, self.device, self.dtype)[0]).cpu()
            if mirrored:  # probabilities already (and their mean squares)
                probs, square = out.chunk(2) if variance else (out, None)
            else:
                probs = out if logits_will_do else softmax_(out)
                square = probs.square() if variance else None
            total = probs if total is None else total.add_(probs)
            if square is not None:
                squares = square if squares is None else squares.add_(square)
        n = len(self.members)
        mean = total.div_(n)
        if self.uncertainty == "entropy":
            extra = -(mean * torch.log(mean.clamp_min(1e-8))).sum(0, keepdim=True)
        elif self.uncertainty == "variance":  # spread of the members (and mirrors), averaged over classes
            extra = (squares.div_(n) - mean.square()).clamp_min_(0).mean(0, keepdim=True)
        elif self.uncertainty is None:
            extra = None
        else:
            raise InputError(f"uncertainty={self.uncertainty}: must be entropy, variance or null")
        if not (probabilities or extra is not None or resampled):
            # Orientation alone permutes voxels, so the argmax commutes with its inverse: invert one uint8
            # channel instead of K float ones (what keeps a 512x512x400 volume within a few GiB).
            labels = argmax_channels(mean)[None]
            del mean, total
            return self.inverted(data, labels)[0].numpy(), None, None
        k = mean.shape[0]
        out = self.inverted(data, mean if extra is None else torch.cat([mean, extra]))  # together: one resampling
        return argmax_channels(out[:k]).numpy(), out[:k].numpy(), (out[k].numpy() if extra is not None else None)

    def inverted(self, data: dict, pred: torch.Tensor) -> torch.Tensor:
        """`pred` (C, *preprocessed grid) mapped back onto the input grid by inverting the preprocessing."""
        # Invertd silently skips a plain tensor: wrap it so the image's transform record applies.
        data["pred"] = MetaTensor(pred)
        return torch.as_tensor(self.invert(data)["pred"])


def softmax_(logits: torch.Tensor) -> torch.Tensor:
    """The softmax over the first (class) axis, in place: a whole volume holds no second K-channel copy."""
    exp = logits.sub_(logits.amax(0, keepdim=True)).exp_()
    return exp.div_(exp.sum(0, keepdim=True))


def argmax_channels(x: torch.Tensor) -> torch.Tensor:
    """argmax over the first (class) axis as uint8, one class at a time: torch's strided argmax over dim 0 of a
    (K, x, y, z) volume is about 10x slower (1.7 s for 5 x 9 M voxels here). Ties go to the lower class, as argmax."""
    best, labels = x[0].clone(), torch.zeros(x.shape[1:], dtype=torch.uint8)
    for k in range(1, x.shape[0]):
        better = x[k] > best
        labels[better] = k
        best = torch.maximum(best, x[k])
    return labels


def postprocess(labels: np.ndarray, largest_component=(), num_components: int = 1, fill_holes=(), min_size: int = 0,
                num_classes: int = 2) -> np.ndarray:
    """Per-class clean-up with MONAI transforms on an (x, y, z) label map."""
    t = torch.as_tensor(labels[None].astype(np.int64))
    if min_size:
        onehot = torch.nn.functional.one_hot(t[0], num_classes).permute(3, 0, 1, 2)
        kept = RemoveSmallObjects(min_size=min_size, independent_channels=True)(onehot[1:])
        t = (kept * torch.arange(1, num_classes).view(-1, 1, 1, 1)).amax(0, keepdim=True)
    if largest_component:
        t = KeepLargestConnectedComponent(applied_labels=list(largest_component), is_onehot=False, independent=True,
                                          num_components=num_components)(t)
    if fill_holes:  # background voxels only: MONAI's FillHoles (in place) also paints over a class inside another
        t = torch.where(t == 0, FillHoles(applied_labels=list(fill_holes))(t.clone()), t)  # (a lesion in an organ)
    return np.asarray(t[0])


def infer(ckpt, input, output, options: PredictOptions | None = None, *, format: str = "nifti",
          overwrite: bool = False, save_probabilities: bool = False, **changes) -> dict:
    """Predict every input (a path or a list of them) into `output` with `options` (and `changes`: PredictOptions
    fields that differ from them); returns {"written": [...], "skipped": [...], "failed": {input: message}}."""
    options = replace(options or PredictOptions(), **changes)
    volumes = [v for path in (input if isinstance(input, (list, tuple, ListConfig)) else [input])
               for v in find_inputs(path)]
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: output exists and is not a folder")
    if format not in FORMATS:
        raise InputError(f"format={format}: must be one of {', '.join(FORMATS)}")
    inputs = {v.path.resolve() for v in volumes}
    for v in volumes:
        if (out_dir / v.output_name(format if format == "input" else "nifti")).resolve() in inputs:
            raise InputError(f"{v.path}: output would overwrite the input; choose another output= folder")
    bundles = {p: checkpoint.load(p) for p in checkpoints(ckpt)}
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"written": [], "skipped": [], "failed": {}}
    # Ctrl-C / SIGTERM stop between volumes: every label map on disk is whole, and a re-run skips them.
    with tempfile.TemporaryDirectory(prefix="pipeline-infer-") as tmp, Interrupts() as interrupts:
        predictor = Predictor(bundles, options)
        log.info(str(predictor))
        try:
            predict_all(predictor, volumes, out_dir, Path(tmp), interrupts, report, options, format,
                        overwrite=overwrite, save_probabilities=save_probabilities)
        finally:  # the label maps written, even those of a stopped run, say which path made them
            record(out_dir, predictor, report["written"])
    return report


def predict_all(predictor: Predictor, volumes: list[Volume], out_dir: Path, tmp: Path, interrupts: Interrupts,
                report: dict, options: PredictOptions, format: str, *, overwrite: bool,
                save_probabilities: bool) -> None:
    """Every volume into out_dir, filling `report`; stops between volumes on a signal."""
    for done, volume in enumerate(tqdm(volumes, desc="infer", unit="volume")):
        if interrupts.signal:
            raise RunStopped(f"interrupted after {done} of {len(volumes)} volumes ({len(report['written'])} "
                             f"written to {out_dir}); a re-run skips them", code=128 + interrupts.signal, prefix="")
        target = out_dir / volume.output_name(format if format == "input" else "nifti")
        if target.exists() and not overwrite:
            report["skipped"].append(target)
            continue
        try:
            predict_one(predictor, volume, target, tmp, save_probabilities=save_probabilities,
                        post=options.postprocess, dicom_seg=format in ("input", "dicom-seg"))
            report["written"].append(target)
        except InputError as err:  # one bad file must not stop a folder run
            report["failed"][volume.path] = str(err)
            log.error(str(err))
        except StorageError as err:  # a full or read-only disk stops them all
            raise StorageError(f"{err}; {len(report['written'])} volumes written before it (a re-run skips "
                               "them)") from err


def record(out_dir: Path, predictor: Predictor, written: list[Path]) -> None:
    """predicted_with.json in out_dir: for each label map there, the path that made it (checkpoints, precision,
    backend, mirrors, windows, CPU). A folder may hold several runs' maps (a cross-validation's folds, a re-run that
    skipped some): earlier entries stay for the maps this run did not write. Best effort: a full disk loses the
    record, never a label map."""
    path = out_dir / RECORD
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        old = {}
    if not (written or old):
        return
    runs = old.get("runs", []) + [predictor.record() | {"date": time.strftime("%Y-%m-%d %H:%M")}]
    volumes = old.get("volumes", {}) | {p.name: len(runs) - 1 for p in written}
    used = sorted(set(volumes.values()))
    try:
        with atomic(path) as tmp:
            tmp.write_text(json.dumps({"runs": [runs[i] for i in used],
                                       "volumes": {v: used.index(i) for v, i in sorted(volumes.items())}}, indent=1))
    except StorageError as err:
        log.warning(f"{err}: {RECORD} not written")


def predict_one(predictor: Predictor, volume: Volume, target: Path, tmp: Path, *, save_probabilities: bool,
                post: dict, dicom_seg: bool = False) -> None:
    """One volume predicted and written on its grid (and as a DICOM-SEG with `dicom_seg` for a DICOM series)."""
    ref = Reference(volume, tmp)
    labels, probs, uncertainty = predictor(ref.nifti_path, probabilities=save_probabilities, source=volume.path)
    if labels.shape != ref.shape:
        raise RuntimeError(f"{volume.path}: prediction shape {labels.shape} does not match the input's {ref.shape}")
    if post:
        labels = postprocess(labels, num_classes=predictor.num_classes, **post)
    if save_probabilities:  # float16 as nnU-Net stores them; NIfTI has no float16
        with atomic(target.parent / volume.output_name("nifti", "_probabilities").replace(".nii.gz", ".npz")) as tmp:
            np.savez_compressed(tmp, probabilities=probs.astype(np.float16), affine=ref.affine)
    if uncertainty is not None:
        ref.write(uncertainty.astype(np.float32), target.parent / volume.output_name("nifti", "_uncertainty"))
    ref.write(labels.astype(label_dtype(predictor.num_classes)), target)
    if dicom_seg and volume.kind == "dicom":  # after the NIfTI: a series DICOM-SEG cannot describe keeps that
        from pipeline.inference.dicomseg import write_seg

        try:
            write_seg(volume.path, labels, predictor.class_names, target.with_name(f"{volume.stem}.seg.dcm"))
        except InputError as err:
            raise InputError(f"{err} (the NIfTI {target} is written)") from None
