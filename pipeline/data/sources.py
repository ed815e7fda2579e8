"""Case lists: read a dataset (MSD `dataset.json`, plain folder pairs or an nnU-Net v2 raw dataset) and split it into
train, val and test."""

import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.core.errors import InputError, faults_error
from pipeline.data.io import as_nifti

log = logging.getLogger(__name__)

# `data.split.test: auto`: a dataset of fewer cases keeps none back for test; every case trains the final model and
# cross-validation (make cv) is the estimate, as nnU-Net does (15% of 10 cases would be 2 to score and 2 fewer to train)
TEST_FROM_CASES, TEST_FRACTION = 30, 0.15


def test_fraction(test, num_cases: int) -> float:
    """The fraction of the cases held out for test: data.split.test, or for `auto` by the dataset's size."""
    if test == "auto":
        return TEST_FRACTION if num_cases >= TEST_FROM_CASES else 0.0
    return float(test)


@dataclass
class Dataset:
    root: Path
    name: str
    labels: dict[int, str]  # class index -> name, background included
    modalities: list[str]
    cases: list[dict]  # {"image": abs path, "label": abs path}


def msd_tasks() -> set[str]:
    """The Medical Segmentation Decathlon's tasks, as `make data task=...` names them."""
    from monai.apps import DecathlonDataset  # here: monai.apps imports more than reading a dataset needs

    return set(DecathlonDataset.resource)


def declared_name(root: Path, meta: dict) -> str:
    """A dataset's name: its dataset.json's "name", else its folder's (what data.name and the MLflow experiment get)."""
    return str(meta.get("name") or root.name)


def dataset_json(root: Path, layout: str, kind: str) -> tuple[Path, dict | None, list[str]]:
    """(`<root>/dataset.json`, its content or None, the fault that stops reading it)."""
    spec = root / "dataset.json"
    if not root.exists() and root.name in msd_tasks():
        return spec, None, [f"{root}: not found; `make data task={root.name}` downloads it there"]
    if not spec.is_file():
        return spec, None, [f"{spec}: not found; data.root must be {layout} (dataset.json, imagesTr/, labelsTr/)"]
    try:
        return spec, json.loads(spec.read_text()), []
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return spec, None, [f"{spec}: not a valid {kind} dataset.json ({type(err).__name__}: {err})"]


def msd_problems(root: str | Path) -> tuple[Dataset | None, list[str]]:
    """Parse `<root>/dataset.json`; every structural fault found, each `file: problem` (see `pipeline.check`)."""
    root = Path(root)
    spec, meta, problems = dataset_json(root, "a folder in MSD layout", "MSD")
    if meta is None:
        return None, problems
    try:
        labels = {int(k): str(v) for k, v in meta["labels"].items()}
        modalities = [str(v) for _, v in sorted(meta["modality"].items(), key=lambda kv: int(kv[0]))]
        # an entry's optional "subject" groups cases of one patient (pipeline/data/subjects.py)
        entries = [(str(c["image"]), str(c["label"]), c.get("subject")) for c in meta["training"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        return None, [f"{spec}: not a valid MSD dataset.json ({type(err).__name__}: {err})"]
    problems, cases, seen = [], [], {}
    base = Path(os.path.normpath(root.absolute()))
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        problems.append(f"{spec}: labels must be 0..N-1 with background 0, got {sorted(labels)}")
    if not entries:
        problems.append(f"{spec}: lists no training cases")
    for image, label, subject in entries:
        case = {} if subject is None else {"subject": str(subject)}
        for key, rel in (("image", image), ("label", label)):
            path = Path(os.path.normpath(base / rel))  # lexical: symlinked files may live elsewhere
            if Path(rel).is_absolute() or not path.is_relative_to(base):
                problems.append(f"{spec}: path {rel} escapes the data root (absolute or ..)")
            elif not path.is_file():
                problems.append(f"{path}: listed in {spec} but missing")
            case[key] = str(path)
        cid = case_id(case)
        if cid in seen:
            problems.append(f"{spec}: case id {cid} listed twice")
        seen[cid] = True
        cases.append(case)
    return Dataset(root, declared_name(root, meta), labels, modalities, cases), problems


def read_msd(root: str | Path) -> Dataset:
    """Parse `<root>/dataset.json`; the first structural fault is an InputError."""
    dataset, problems = msd_problems(root)
    if problems:
        raise faults_error(problems, root)
    return dataset


def folders_problems(root: str | Path, images: str, labels: str,
                     class_names: list[str] | None) -> tuple[Dataset | None, list[str]]:
    """Plain folder pairs: `<root>/<images>/x.nii.gz` with `<root>/<labels>/x.nii.gz` (same file names); every
    structural fault found, as msd_problems. class_names `auto`: background and class1..N, N the largest label
    value of any label file."""
    root = Path(root)
    if class_names == "auto":
        class_names = label_names(root / labels)
    if not class_names:
        return None, [f"{root}: data.class_names must list the classes (background first) for a folders layout"]
    image_dir, label_dir = root / images, root / labels
    missing = [f"{d}: folder not found (data.layout=folders expects {images}/ and {labels}/ under data.root)"
               for d in (image_dir, label_dir) if not d.is_dir()]
    if missing:
        return None, missing
    cases, problems = [], []
    for image in sorted(p for p in image_dir.iterdir() if p.name.endswith((".nii", ".nii.gz"))):
        label = label_dir / image.name
        if not label.is_file():
            problems.append(f"{image}: no label with the same name in {label_dir}")
        cases.append({"image": str(image.resolve()), "label": str(label.resolve())})
    if not cases:
        problems.append(f"{image_dir}: holds no .nii or .nii.gz images")
    return Dataset(root, root.name, dict(enumerate(class_names)), ["image"], cases), problems


def label_names(folder: Path) -> list[str] | None:
    """background, class1..N for the label maps in `folder` (N: their largest value); None where none is readable."""
    top = None
    for path in sorted(folder.glob("*.nii*")) if folder.is_dir() else []:
        try:
            top = max(top or 0, int(np.asarray(nib.load(path).dataobj).max()))
        except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError):
            continue  # the dataset check names an unreadable file; here it adds no class
    return None if top is None else ["background", *(f"class{i}" for i in range(1, max(top, 1) + 1))]


def nnunet_problems(root: str | Path, converted: str | Path) -> tuple[Dataset | None, list[str]]:
    """An nnU-Net v2 raw dataset as nnU-Net reads it: cases are the label files `labelsTr/<case><file_ending>`,
    each with `imagesTr/<case>_<XXXX><file_ending>` per entry of `channel_names`; every structural fault found.

    The pipeline trains on one NIfTI per case (MONAI's NibabelReader), so a case with several channels or a
    .nrrd/.mha ending gets a NIfTI copy under `converted` (made once, reused while newer than its sources);
    the dataset itself is never written to."""
    root = Path(root)
    spec, meta, problems = dataset_json(root, "an nnU-Net v2 raw dataset", "nnU-Net v2")
    if meta is None:
        return None, problems
    try:
        channels = [str(v) for _, v in sorted(meta["channel_names"].items(), key=lambda kv: int(kv[0]))]
        raw_labels, ending, declared = dict(meta["labels"]), str(meta["file_ending"]), int(meta["numTraining"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        return None, [f"{spec}: not a valid nnU-Net v2 dataset.json ({type(err).__name__}: {err})"]
    regions = [name for name, value in raw_labels.items() if isinstance(value, (list, tuple))]
    if regions or "regions_class_order" in meta:
        key = f"labels.{regions[0]}" if regions else "regions_class_order"
        return None, [f"{spec}: {key}: region-based labels are not supported; each class needs one integer label"]
    labels = {int(v): str(k) for k, v in raw_labels.items()}
    problems = []
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        problems.append(f"{spec}: labels must be 0..N-1 with background 0, got {sorted(labels)}")
    label_files = sorted((root / "labelsTr").glob(f"*{ending}"))
    if len(label_files) != declared:
        problems.append(f"{spec}: numTraining is {declared} but {root / 'labelsTr'} holds {len(label_files)} "
                        f"{ending} files")
    store = Path(converted) / f"{root.name}-{hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:8]}"
    cases = []
    for label in label_files:
        cid = label.name.removesuffix(ending)
        images = [root / "imagesTr" / f"{cid}_{c:04d}{ending}" for c in range(len(channels))]
        if missing := [p for p in images if not p.is_file()]:
            problems.append(f"{missing[0]}: missing (channel {images.index(missing[0])} of case {cid}, "
                            f"listed in {spec} channel_names)")
            continue
        if ending in (".nii.gz", ".nii") and len(images) == 1:
            cases.append({"image": os.path.abspath(images[0]), "label": os.path.abspath(label)})  # lexical, as msd
            continue
        try:
            cases.append({"image": str(as_nifti(images, store / "imagesTr" / f"{cid}.nii.gz")),
                          "label": str(as_nifti([label], store / "labelsTr" / f"{cid}.nii.gz"))})
        except InputError as err:
            problems.append(str(err))
    if not label_files:
        problems.append(f"{root / 'labelsTr'}: holds no {ending} label files")
    return Dataset(root, declared_name(root, meta), labels, channels, cases), problems


def detect_layout(root: Path) -> str:
    """`data.layout: auto`: nnunet for a dataset.json with channel_names (nnU-Net v2), msd for another dataset.json,
    folders without one."""
    try:
        meta = json.loads((root / "dataset.json").read_text())
    except FileNotFoundError:
        return "folders"
    except (OSError, ValueError):
        return "msd"  # an unreadable dataset.json: msd_problems names the fault
    return "nnunet" if isinstance(meta, dict) and "channel_names" in meta else "msd"


def dataset_problems(data: DictConfig) -> tuple[Dataset | None, list[str]]:
    """The dataset at data.root in its data.layout (msd | folders | nnunet | auto), with every structural fault
    found."""
    root = Path(data.root).expanduser()
    layout = detect_layout(root) if data.layout == "auto" and root.is_dir() else data.layout
    if layout in ("msd", "auto"):  # auto on a missing folder: msd_problems says it is not there
        return msd_problems(root)
    if layout == "folders":
        names = None if OmegaConf.is_missing(data, "class_names") else data.get("class_names")
        return folders_problems(root, data.images, data.labels, names)
    if layout == "nnunet":
        return nnunet_problems(root, data.converted)
    return None, [f"{root}: data.layout={data.layout}: must be msd, folders, nnunet or auto"]


def read_dataset(data: DictConfig) -> Dataset:
    """The dataset at data.root; its first structural fault is an InputError (pipeline.check lists them all)."""
    dataset, problems = dataset_problems(data)
    if problems:
        raise faults_error(problems, data.root)
    return dataset


def case_id(case: dict) -> str:
    """A case's name: its label file's (the image's, for MSD and folder pairs the same name; nnU-Net's images carry
    a _0000 channel suffix)."""
    return Path(case.get("label") or case["image"]).name.removesuffix(".gz").removesuffix(".nii")


def split(cases: list[dict], val: float, test: float, seed: int, folds: int = 5, fold: int | None = None,
          subjects: list[str] | None = None, fixed: list[dict] | None = None) -> dict[str, list[dict]]:
    """Deterministic train/val/test split from a seed.

    The test cases are held out first; the rest is split by the `val` fraction, or, when `fold` is given, into
    `folds` nnU-Net-style cross-validation folds of which fold `fold` validates. No case is in two splits, except
    with fold="all" (nnU-Net's final model): every non-test case trains, and the `val` fraction of them is watched.
    subjects: each case's subject (pipeline/data/subjects.py): a subject's cases stay in one split and one fold; with
    every case its own subject the split is the one without. fixed: nnU-Net's splits_final.json folds, used as listed.
    """
    if fixed is not None:
        return listed_fold(cases, fixed, folds, fold)
    units = subject_units(cases, subjects)
    units = [units[i] for i in np.random.default_rng(seed).permutation(len(units))]
    held_out, rest = take(units, round(len(cases) * test_fraction(test, len(cases))))
    n_rest = sum(map(len, rest))
    if fold is None or fold == "all":
        val_units, train_units = take(rest, min(max(1, round(len(cases) * val)), n_rest - 1), keep=1)
        parts = {"train": rest if fold == "all" else train_units, "val": val_units}
    else:
        if not isinstance(fold, int) or not 0 <= fold < folds:
            raise InputError(f"data.fold={fold}: must be in 0..{folds - 1}, or all")
        if len(rest) < folds:
            grouped = f" (in {len(units)} subjects, each kept in one fold)" if subjects is not None else ""
            raise InputError(f"{len(cases)} cases are too few for {folds} folds after holding out "
                             f"{sum(map(len, held_out))} for test{grouped}")
        chunks = fold_chunks(rest, folds)
        parts = {"train": [u for k, c in enumerate(chunks) if k != fold for u in c], "val": chunks[fold]}
    parts = {k: [case for unit in v for case in unit] for k, v in parts.items()}
    if not parts["train"] or not parts["val"]:
        raise InputError(f"{len(cases)} cases are too few for split val={val}, test={test}, folds={folds}")
    return parts | {"test": [case for unit in held_out for case in unit]}


def subject_units(cases: list[dict], subjects: list[str] | None) -> list[list[dict]]:
    """The cases as units that are never parted: one per subject, in order of first appearance."""
    if subjects is None:
        return [[case] for case in cases]
    units: dict[str, list[dict]] = {}
    for case, s in zip(cases, subjects, strict=True):
        units.setdefault(s, []).append(case)
    return list(units.values())


def take(units: list[list[dict]], n: int, keep: int = 0) -> tuple[list, list]:
    """(the first units holding at least n cases, the rest), leaving at least `keep` units in the rest."""
    count, i = 0, 0
    while count < n and i < len(units) - keep:
        count, i = count + len(units[i]), i + 1
    return units[:i], units[i:]


def fold_chunks(units: list[list[dict]], folds: int) -> list[list[list[dict]]]:
    """`folds` consecutive runs of units whose case counts are as close as whole units allow to np.array_split's
    (the same folds where every unit is one case)."""
    targets = np.cumsum([len(c) for c in np.array_split(np.arange(sum(map(len, units))), folds)])
    ends, counts = [], np.cumsum([len(u) for u in units])
    for k, target in enumerate(targets[:-1]):
        low, high = (ends[-1] if ends else 0) + 1, len(units) - (folds - 1 - k)  # at least one unit a fold
        ends.append(min(range(low, high + 1), key=lambda e: abs(counts[e - 1] - target)))
    bounds = [0, *ends, len(units)]
    return [units[a:b] for a, b in zip(bounds, bounds[1:])]


def listed_fold(cases: list[dict], fixed: list[dict], folds: int, fold) -> dict[str, list[dict]]:
    """Fold `fold` of nnU-Net's splits_final.json, its train and val cases as listed (no fold: fold 0; `all`: every
    listed case trains, fold 0's validation cases are watched); cases in no fold are the test split."""
    if fold not in (None, "all") and (not isinstance(fold, int) or not 0 <= fold < len(fixed)):
        raise InputError(f"data.fold={fold}: splits_final.json lists folds 0..{len(fixed) - 1}, or all")
    if isinstance(fold, int) and folds != len(fixed):
        raise InputError(f"data.split.folds={folds}, but splits_final.json lists {len(fixed)} folds "
                         f"(make cv FOLDS={len(fixed)})")
    ids = {c for f in fixed for part in f.values() for c in part}
    listed = [c for c in cases if case_id(c) in ids]
    by_id, chosen = {case_id(c): c for c in cases}, fixed[fold if isinstance(fold, int) else 0]
    train = listed if fold == "all" else [by_id[c] for c in chosen["train"]]
    return {"train": train, "val": [by_id[c] for c in chosen["val"]], "test": [c for c in cases if c not in listed]}


def ensure_demo_data(data: DictConfig) -> None:
    """Generate the demo phantoms when data.root is their folder and holds no dataset.json yet."""
    synth = data.get("synthesize")
    root = Path(data.root).expanduser().resolve()
    # Only the demo folder is ever generated: a mistyped data.root must fail, not fill up with phantoms.
    if synth and Path(synth.folder).resolve() == root and not (root / "dataset.json").exists():
        from pipeline.data.phantom import synthesize

        log.info(f"generating the demo dataset in {root} ({synth.num_cases} cases, seed {synth.seed})")
        synthesize(root, synth.num_cases, synth.seed)


def data_facts(data: DictConfig, dataset: Dataset) -> dict:
    """What the data config leaves to the dataset (`???` or null): root (absolute), name, classes, channels."""
    def given(key):
        return None if OmegaConf.is_missing(data, key) else data.get(key)

    num_classes = given("num_classes") or len(dataset.labels)
    return {
        "root": str(Path(data.root).expanduser().resolve()),
        "name": given("name") or dataset.name,
        "num_classes": num_classes,
        "in_channels": given("in_channels") or len(dataset.modalities),
        "class_names": [dataset.labels.get(i, f"class{i}") for i in range(num_classes)],
    }
