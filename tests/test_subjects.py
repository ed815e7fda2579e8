"""Subjects stay together: grouped splits and folds on ACDC's case names, nnU-Net's splits_final.json, the check's
warning."""

import json
from collections import Counter

import pytest
from omegaconf import OmegaConf

from pipeline.core.errors import InputError
from pipeline.data.checks import check
from pipeline.data.sources import case_id, read_msd, split
from pipeline.data.subjects import fixed_folds, grouping, looks_grouped_warning, split_dataset
from tests.conftest import compose_config, shared_dataset, shared_subset


def acdc_names() -> tuple[list[dict], list[str]]:
    cases = read_msd(shared_dataset("acdc_cardiac")).cases  # dataset.json and file presence only: no image read
    return cases, [case_id(c) for c in cases]


def patient(case: dict) -> str:
    return case_id(case).split("_")[0]


def test_acdc_frames_of_one_patient_never_part_across_folds_or_test():
    cases, names = acdc_names()
    grouped = grouping(cases, names, "auto", folds=5)
    assert len(set(grouped.subjects)) == 80 and set(Counter(grouped.subjects).values()) == {2}
    assert grouped.subjects[:2] == ["patient001", "patient001"]
    assert grouped.describe(160).startswith("160 cases of 80 subjects")
    folds = [split(cases, 0.15, 0.15, 0, folds=5, fold=k, subjects=grouped.subjects) for k in range(5)]
    test = {patient(c) for c in folds[0]["test"]}
    assert len(folds[0]["test"]) == 24 and len(test) == 12  # 15%: 12 patients, both frames each
    validated = Counter(case_id(c) for f in folds for c in f["val"])
    assert len(validated) == 136 and set(validated.values()) == {1}  # every non-test case validated once
    for f in folds:
        train, val = {patient(c) for c in f["train"]}, {patient(c) for c in f["val"]}
        assert not train & val and not (train | val) & test
        assert len(f["val"]) in (26, 28)  # 136 cases in 5 folds of whole patients: as even as pairs allow
    # ungrouped, the same seed parts most patients' frames between folds: what grouping prevents
    loose = split(cases, 0.15, 0.15, 0, folds=5, fold=0)
    assert {patient(c) for c in loose["train"]} & {patient(c) for c in loose["val"]}


def test_every_case_its_own_subject_gives_the_ungrouped_split():
    cases = [{"image": f"case_{i:03d}"} for i in range(23)]
    own = [c["image"] for c in cases]
    for fold in (None, "all", 0, 3):
        assert split(cases, 0.15, 0.15, 0, 5, fold, subjects=own) == split(cases, 0.15, 0.15, 0, 5, fold)


def test_a_pattern_names_subjects_and_a_pattern_that_groups_nothing_is_one_line():
    cases = [{"image": n} for n in ("a_visit1", "a_visit2", "b_visit1", "c_visit1")]
    names = [c["image"] for c in cases]
    assert grouping(cases, names, r"^([a-z])_", 2).subjects == ["a", "a", "b", "c"]
    with pytest.raises(InputError, match=r"data.split.group='\^x\(\\d\+\)': groups none of the 4 case names"):
        grouping(cases, names, r"^x(\d+)", 2)
    # dataset.json's "subject" field wins over any setting
    marked = [dict(c, subject="s1" if i < 2 else f"s{i}") for i, c in enumerate(cases)]
    assert grouping(marked, names, None, 2).subjects == ["s1", "s1", "s2", "s3"]


def test_names_that_share_a_dataset_prefix_do_not_look_grouped():
    for names in ([f"hippocampus_{i:03d}" for i in range(50)], [f"IBSR_{i:02d}" for i in range(10)],
                  ["example_ct", "example_ct_sm"], [f"la_{i:03d}" for i in range(80)]):
        cases = [{"image": n} for n in names]
        assert grouping(cases, names, "auto", 5).subjects is None
        assert looks_grouped_warning("root", names, None, 5, has_fixed=False) is None


def test_the_check_warns_on_acdc_names_without_a_grouping():
    _, names = acdc_names()
    warning = looks_grouped_warning("acdc", names, None, 5, has_fixed=False)
    assert warning.startswith("acdc: case names look grouped by subject (patient001_frame01, patient001_frame12 -> "
                              "patient001; 80 subjects for 160 cases)")
    assert "\n" not in warning
    assert looks_grouped_warning("acdc", names, "auto", 5, has_fixed=False) is None  # a grouping is set
    assert looks_grouped_warning("acdc", names, None, 5, has_fixed=True) is None  # splits_final.json or subject field


def acdc_copy(folder, pairs: int = 6):
    """A small dataset of ACDC's first `pairs` patients under their real case names (links to the files)."""
    return shared_subset("acdc_cardiac", folder, 2 * pairs)


def test_pipeline_check_warns_and_split_keeps_pairs_on_a_dataset_with_acdc_names(tmp_path):
    root = acdc_copy(tmp_path / "acdc")
    cfg = compose_config("train", [f"data.root={root}", "data=msd", "data.split.folds=3", "data.fold=0"], tmp_path)
    report = check(cfg, progress=False)
    assert not report["faults"] and len(report["warnings"]) == 1 and "look grouped" in report["warnings"][0]
    OmegaConf.update(cfg, "data.split.group", "auto")
    assert check(cfg, progress=False)["warnings"] == []
    parts, how = split_dataset(cfg.data, read_msd(root))
    assert how.startswith("12 cases of 6 subjects")
    assert not {patient(c) for c in parts["train"]} & {patient(c) for c in parts["val"]}


def test_splits_final_json_is_honoured_as_nnunet_honours_it(tmp_path):
    root = acdc_copy(tmp_path / "acdc", pairs=4)
    names = [case_id(c) for c in read_msd(root).cases]
    listed = [{"train": names[2:6], "val": names[:2]}, {"train": names[:2] + names[4:6], "val": names[2:4]}]
    (root / "splits_final.json").write_text(json.dumps(listed))
    cfg = compose_config("train", [f"data.root={root}", "data=msd", "data.split.folds=2"], tmp_path)
    dataset = read_msd(root)
    for k in (0, 1):
        OmegaConf.update(cfg, "data.fold", k)
        parts, how = split_dataset(cfg.data, dataset)
        assert [case_id(c) for c in parts["train"]] == listed[k]["train"]
        assert [case_id(c) for c in parts["val"]] == listed[k]["val"]
        assert [case_id(c) for c in parts["test"]] == names[6:]  # in no fold: held out
        assert how.startswith("2 folds as ") and how.endswith("splits_final.json lists them")
    OmegaConf.update(cfg, "data.fold", "all")
    assert [case_id(c) for c in split_dataset(cfg.data, dataset)[0]["train"]] == names[:6]
    OmegaConf.update(cfg, "data.split.folds", 5)
    OmegaConf.update(cfg, "data.fold", 1)
    with pytest.raises(InputError, match="data.split.folds=5, but splits_final.json lists 2 folds"):
        split_dataset(cfg.data, dataset)
    (root / "splits_final.json").write_text(json.dumps([{"train": ["nobody"], "val": names[:1]}]))
    with pytest.raises(InputError, match="fold 0 names 1 cases the dataset does not hold, e.g. nobody"):
        fixed_folds(root, names)
