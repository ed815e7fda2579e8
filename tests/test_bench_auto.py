"""bench/auto.py, marked slow: one fold of the BRATS subset end to end (conversion, the planned recipe, the scoring with
the tumour regions) into a results page, a JSON row and the README's table, all written by the benchmark."""

import json
import subprocess
import sys

import pytest

from pipeline import project_root
from tests.conftest import shared_dataset


@pytest.mark.slow
def test_one_brats_fold_is_trained_scored_by_class_and_region_and_tabulated(tmp_path):
    data = shared_dataset("brats2015_subset")
    readme = tmp_path / "README.md"
    readme.write_text((project_root() / "README.md").read_text())
    args = [sys.executable, str(project_root() / "bench" / "auto.py"), "brats", "--folds", "0", "--minutes", "0.3",
            "--data", str(data), "--out", str(tmp_path / "out"), "--results", str(tmp_path / "results"),
            "--readme", str(readme), "--set", "plan.base_filters=8", "trainer.val_every=1000"]
    done = subprocess.run(args, cwd=project_root(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    row = json.loads((tmp_path / "results" / "auto.json").read_text())["brats"]
    assert row["folds"] == [0] and row["of_folds"] == 4 and row["cases_scored"] == 1  # leave one out: fold 0's case
    assert set(row["dice"]) == {"necrosis", "edema", "non-enhancing", "enhancing"}
    assert set(row["regions"]) == {"whole_tumour", "tumour_core", "enhancing_tumour"}
    assert 0 <= row["regions"]["whole_tumour"]["dice"] <= 1
    assert row["budget_minutes"] == 0.3 and row["epochs"][0] >= 1 and row["run_minutes"][0] > 0
    page = (tmp_path / "results" / "auto.md").read_text()
    assert "## brats (brats2015_subset)" in page and "| region whole_tumour |" in page
    # four cases are a path check: on the results page, not in the README's table of estimates
    table = readme.read_text().split("<!-- bench/auto.py writes this table -->")[1].split("<!-- end of")[0]
    assert "| task | scored on |" in table and "| brats |" not in table
    assert row["machine"]["cpu"] in done.stdout  # the CPU class, printed first
