"""`make data task=...`: download with MONAI's helpers (md5 checked), unpack whole or not at all, then check."""

import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline import project_root
from pipeline.core.errors import InputError
from pipeline.data.download import fetch, msd_source


def archive(dataset: Path, path: Path, task: str) -> tuple[str, str]:
    """A .tar of `dataset` as <task>/... (as the MSD archives are), its file:// URL and md5."""
    with tarfile.open(path, "w") as tar:
        tar.add(dataset, arcname=task)
    return path.as_uri(), hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.slow  # a download served and checked end to end: `make test-slow`
def test_an_archive_is_downloaded_checked_and_unpacked_in_one_command(tiny_phantom, tmp_path):
    url, md5 = archive(tiny_phantom, tmp_path / "Task99_Tiny.tar", "Task99_Tiny")
    done = subprocess.run([sys.executable, "-m", "pipeline.download", "task=Task99_Tiny", f"url={url}", f"md5={md5}",
                           f"root={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=project_root())
    assert done.returncode == 0, done.stderr[-2000:]
    target = tmp_path / "data" / "Task99_Tiny"
    assert (target / "dataset.json").is_file() and len(list((target / "imagesTr").iterdir())) == 8
    assert f"{target}: 8 cases, 0 faults" in done.stdout
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".downloads", "Task99_Tiny"]  # no .unpack-*
    assert fetch("Task99_Tiny", tmp_path / "data", url, md5) == target  # there already: nothing downloaded


def test_a_corrupt_or_mismatched_download_leaves_nothing_half_unpacked(tiny_phantom, tmp_path):
    url, md5 = archive(tiny_phantom, tmp_path / "Task98_Cut.tar", "Task98_Cut")
    root = tmp_path / "data"
    with pytest.raises(InputError, match=r"Task98_Cut.tar: md5 of the download differs from 0{32} "
                                         r"\(corrupt or incomplete\); nothing was kept or unpacked"):
        fetch("Task98_Cut", root, url, "0" * 32)
    assert list((root / ".downloads").iterdir()) == []
    cut = tmp_path / "cut" / "Task98_Cut.tar"  # a truncated archive whose md5 is its own: unpacking fails
    cut.parent.mkdir()
    cut.write_bytes((tmp_path / "Task98_Cut.tar").read_bytes()[:300_000])
    with pytest.raises(InputError, match=r"Task98_Cut.tar: not a readable archive .*; nothing was unpacked"):
        fetch("Task98_Cut", root, cut.as_uri(), hashlib.md5(cut.read_bytes()).hexdigest())
    assert sorted(p.name for p in root.iterdir()) == [".downloads"]  # no Task98_Cut, no .unpack-* folder


def test_msd_tasks_come_with_their_url_and_md5_and_unknown_ones_say_what_to_give():
    url = "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task04_Hippocampus.tar"
    assert msd_source("Task04_Hippocampus") == (url, "9d24dba78a72977dbd1d2e110310f31b")
    with pytest.raises(InputError, match="task=Task42_Nothing: not an MSD task .*; for another dataset give url="):
        msd_source("Task42_Nothing")
