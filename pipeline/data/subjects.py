"""Which cases belong to one subject (a patient's cine frames, follow-up scans), and nnU-Net's fixed folds.

Cases of one subject are split together, so that no fold validates, and no test case scores, anatomy its training saw
(ACDC's two frames of a heart are near copies: split apart, they inflate every estimate). MONAI and scikit-learn's
GroupKFold split lists, not datasets; the rules that name a case's subject live here.
"""

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import InputError
from pipeline.data.sources import case_id, split

# The case name without its last `_` part (patient001_frame01 -> patient001, sub-01_ses-02 -> sub-01), or, in a name
# without `_`, its last `-` part. `data.split.group: auto` uses it only where the names look grouped (see grouped_names)
NAME_RULE = r"^(.+)_[^_]+$|^(.+)-[^-]+$"


@dataclass
class Grouping:
    subjects: list[str] | None  # each case's subject (None: every case is its own)
    how: str  # the rule, as the split and plan lines print it

    def describe(self, num_cases: int) -> str:
        """E.g. '160 cases of 80 subjects (case name rule ...; patient001: patient001_frame01, patient001_frame12)'."""
        if self.subjects is None:
            return f"{num_cases} cases, each its own subject ({self.how})"
        counts = Counter(self.subjects)
        example = next((s for s, n in counts.items() if n > 1), self.subjects[0])
        return f"{num_cases} cases of {len(counts)} subjects ({self.how}; e.g. {example}: {counts[example]} cases)"


def subject(name: str, pattern: str) -> str:
    """The subject a case name belongs to under `pattern`: its first matching group, or the whole match; the name
    itself where the pattern does not match (a case of its own)."""
    m = re.search(pattern, name)
    if m is None:
        return name
    found = [g for g in m.groups() if g]
    return found[0] if found else m.group(0)


def grouped_names(names: list[str], folds: int) -> list[str] | None:
    """The subjects by NAME_RULE where the names look grouped: some subject holds several cases, there are enough
    subjects for the folds, and no subject holds more than a fold's share (a shared prefix such as `hippocampus_` or
    `LA_` names a dataset, not a subject). None where they do not look grouped."""
    subjects = [subject(n, NAME_RULE) for n in names]
    counts = Counter(subjects)
    most = max(counts.values(), default=0)
    if most > 1 and len(counts) >= max(folds, 2) and most <= len(names) / max(folds, 2):
        return subjects
    return None


def grouping(cases: list[dict], names: list[str], setting: str | None, folds: int) -> Grouping:
    """Each case's subject: dataset.json's `subject` field where its entries carry one; else by `data.split.group`:
    a regular expression on the case name (its first group, or the whole match, names the subject), `auto` (NAME_RULE
    where the names look grouped), or null (every case its own)."""
    if any("subject" in c for c in cases):
        return Grouping([str(c.get("subject", n)) for c, n in zip(cases, names)], "dataset.json's subject field")
    if setting in (None, "none"):
        return Grouping(None, "data.split.group=null")
    if setting == "auto":
        subjects = grouped_names(names, folds)
        return Grouping(subjects, f"case names grouped by the rule {NAME_RULE!r}" if subjects else
                        "data.split.group=auto: the case names do not look grouped")
    try:
        re.compile(setting)
    except re.error as err:
        raise InputError(f"data.split.group='{setting}': not a regular expression ({err})") from err
    subjects = [subject(n, setting) for n in names]
    if len(set(subjects)) == len(names):
        raise InputError(f"data.split.group='{setting}': groups none of the {len(names)} case names (e.g. "
                         f"{names[0]!r} -> {subjects[0]!r}); its first group should name the subject")
    return Grouping(subjects, f"data.split.group='{setting}'")


def looks_grouped_warning(root, names: list[str], setting, folds: int, has_fixed: bool) -> str | None:
    """pipeline.check's warning where case names look grouped and nothing groups them."""
    if setting not in (None, "none") or has_fixed or (subjects := grouped_names(names, folds)) is None:
        return None
    counts = Counter(subjects)
    example = next(s for s, n in counts.items() if n > 1)
    members = [n for n, s in zip(names, subjects) if s == example]
    return (f"{root}: case names look grouped by subject ({', '.join(members)} -> {example}; {len(counts)} subjects "
            f"for {len(names)} cases) but data.split.group is null: folds and the test split may part one subject's "
            f"cases; set data.split.group=auto (or a pattern), or give a splits_final.json")


SPLITS_FILE = "splits_final.json"  # nnU-Net's fixed folds: [{"train": [case ids], "val": [case ids]}, ...]


def fixed_folds(root: str | Path, names: list[str]) -> list[dict] | None:
    """`<root>/splits_final.json` as nnU-Net reads it (a list of folds, each its train and val case ids), checked
    against the dataset's cases; None where there is none."""
    path = Path(root).expanduser() / SPLITS_FILE
    if not path.is_file():
        return None
    try:
        folds = json.loads(path.read_text())
        folds = [{"train": [str(c) for c in f["train"]], "val": [str(c) for c in f["val"]]} for f in folds]
    except (ValueError, TypeError, KeyError) as err:
        raise InputError(f"{path}: not nnU-Net's splits_final.json (a list of {{'train': [...], 'val': [...]}}): "
                         f"{type(err).__name__}: {err}") from err
    known = set(names)
    for k, f in enumerate(folds):
        if unknown := sorted(set(f["train"] + f["val"]) - known):
            raise InputError(f"{path}: fold {k} names {len(unknown)} cases the dataset does not hold, e.g. "
                             f"{unknown[0]}")
        if both := sorted(set(f["train"]) & set(f["val"])):
            raise InputError(f"{path}: fold {k} trains and validates {both[0]}")
        if not f["train"] or not f["val"]:
            raise InputError(f"{path}: fold {k} has no {'training' if not f['train'] else 'validation'} cases")
    if not folds:
        raise InputError(f"{path}: lists no folds")
    return folds


def split_dataset(data, dataset) -> tuple[dict[str, list[dict]], str]:
    """(train / val / test cases for data.fold, how they were grouped): the config's split of the dataset, nnU-Net's
    splits_final.json where the data root holds one, subjects kept together."""
    s, names = data.split, [case_id(c) for c in dataset.cases]
    if (fixed := fixed_folds(data.root, names)) is not None:
        how = f"{len(fixed)} folds as {Path(data.root) / SPLITS_FILE} lists them"
        return split(dataset.cases, s.val, s.test, s.seed, s.folds, data.fold, fixed=fixed), how
    grouped = grouping(dataset.cases, names, s.get("group"), s.folds)
    parts = split(dataset.cases, s.val, s.test, s.seed, s.folds, data.fold, subjects=grouped.subjects)
    return parts, grouped.describe(len(dataset.cases))
