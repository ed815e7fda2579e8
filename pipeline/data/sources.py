"""Case lists: read a dataset in Medical Segmentation Decathlon layout and split it into train and validation."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, open_dict

from pipeline.errors import InputError


@dataclass
class MSDDataset:
    root: Path
    name: str
    labels: dict[int, str]  # class index -> name, background included
    modalities: list[str]
    cases: list[dict]  # {"image": abs path, "label": abs path}


def read_msd(root: str | Path) -> MSDDataset:
    """Parse `<root>/dataset.json` and check every listed file exists."""
    root = Path(root)
    spec = root / "dataset.json"
    if not spec.is_file():
        raise InputError(f"{spec}: not found; data.root must be a folder in MSD layout (dataset.json, imagesTr/, labelsTr/)")
    try:
        meta = json.loads(spec.read_text())
        labels = {int(k): str(v) for k, v in meta["labels"].items()}
        modalities = [str(v) for _, v in sorted(meta["modality"].items(), key=lambda kv: int(kv[0]))]
        cases = [{"image": str((root / c["image"]).resolve()), "label": str((root / c["label"]).resolve())} for c in meta["training"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"{spec}: not a valid MSD dataset.json ({type(err).__name__}: {err})") from None
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise InputError(f"{spec}: labels must be 0..N-1 with background 0, got {sorted(labels)}")
    for case in cases:
        for key in ("image", "label"):
            if not Path(case[key]).is_file():
                raise InputError(f"{case[key]}: listed in {spec} but missing")
    if not cases:
        raise InputError(f"{spec}: lists no training cases")
    return MSDDataset(root, str(meta.get("name") or root.name), labels, modalities, cases)


def split(cases: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A deterministic shuffled split; at least one case on each side."""
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(max(1, round(len(cases) * val_fraction)), len(cases) - 1)
    return [cases[i] for i in order[n_val:]], [cases[i] for i in order[:n_val]]


def resolve_data(cfg: DictConfig) -> MSDDataset:
    """Find (or synthesize) the dataset and fill what the config leaves to it: root, name, classes, channels.

    Other config nodes interpolate `${data.num_classes}` and friends, so this runs before anything is instantiated.
    """
    root = Path(cfg.data.root).expanduser().resolve()
    synth = cfg.data.get("synthesize")
    # Only the demo folder is ever generated: a mistyped data.root must fail, not fill up with phantoms.
    if synth and Path(synth.folder).resolve() == root and not (root / "dataset.json").exists():
        from pipeline.data.phantom import synthesize

        print(f"generating the demo dataset in {root} ({synth.num_cases} cases, seed {synth.seed})")
        synthesize(root, synth.num_cases, synth.seed)
    dataset = read_msd(root)
    with open_dict(cfg):
        cfg.data.root = str(root)
        cfg.data.name = cfg.data.name or dataset.name
        cfg.data.num_classes = cfg.data.num_classes or len(dataset.labels)
        cfg.data.in_channels = cfg.data.in_channels or len(dataset.modalities)
        cfg.data.class_names = [dataset.labels.get(i, f"class{i}") for i in range(cfg.data.num_classes)]
    return dataset
