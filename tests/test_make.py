"""The Makefile as users call it: overrides reach Hydra unchanged and in order, `make help` lists every target, and
`make install` replaces a torch build that differs from TORCH. Dry runs (`make -n`): nothing trains or installs."""

import os
import re
import shlex
import subprocess

import pytest

from pipeline import project_root
from pipeline.core.config import compose


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARGS")}


def make_dry_run(target: str, *args: str) -> list[str]:
    """The commands `make -n <target> <args>` would run."""
    # A clean environment: under `make test` the parent make's MAKEFLAGS (and `make test ARGS=...`'s ARGS, which make
    # exports) would otherwise reach this make too.
    env = clean_env()
    dry = subprocess.run(["make", "--no-print-directory", "-n", target, *args],
                         capture_output=True, text=True, cwd=project_root(), env=env, check=True)
    return dry.stdout.strip().splitlines()


def test_make_passes_every_override_to_hydra_unchanged_and_in_order():
    overrides = ["model=unet3d", "loss=dicefocal", "optimizer=sgd", "trainer.max_epochs=3", "+extra.list=[1,2]"]
    command = make_dry_run("train", *overrides)[-1]
    assert command.endswith("-m pipeline.train " + " ".join(f"'{o}'" for o in overrides)), command


def test_make_cv_gives_its_evaluations_the_tracking_overrides_and_nothing_else():
    train, cv, test = make_dry_run("cv", "experiment=hippocampus", "tracking=none", "data.batch_size=2",
                                   "CV_DIR=outputs/cv/x")[-3:]
    assert train.endswith("hydra.sweep.dir=outputs/cv/x 'experiment=hippocampus' 'tracking=none' "
                          "'data.batch_size=2'"), train
    assert cv.endswith("-m pipeline.evaluate ckpt=outputs/cv/x split=cv output=outputs/cv/x/cv 'tracking=none'"), cv
    assert test.endswith("if_empty=skip output=outputs/cv/x/ensemble_test 'tracking=none'"), test


def test_make_cv_folds_sets_the_number_of_folds_and_is_no_hydra_key():
    train = make_dry_run("cv", "experiment=auto", "FOLDS=4", "CV_DIR=outputs/cv/x")[-3]
    assert "--multirun 'data.fold=range(0,4)' data.split.folds=4 hydra.sweep.dir=outputs/cv/x" in train, train
    assert train.endswith("'experiment=auto'") and "FOLDS=" not in train, train


def hydra_words(command: str, module: str) -> list[str]:
    """The words the shell hands `python -m <module>` in a command make would run."""
    words = shlex.split(command)
    return words[words.index(module) + 1:]


def test_overrides_with_spaces_quotes_dollars_and_a_leading_tilde_reach_hydra_as_typed():
    args = "'data.class_names=[background, liver]' ~transforms.augment.noise"
    command = make_dry_run("train", "data=folders", "tracking.experiment=\"it's mine\"", "paths.data=${oc.env:HOME}",
                           f"ARGS={args}")[-1]
    words = hydra_words(command, "pipeline.train")
    assert words == ["data=folders", "tracking.experiment=\"it's mine\"", "paths.data=${oc.env:HOME}",
                     "data.class_names=[background, liver]", "~transforms.augment.noise"], command
    cfg = compose("train", words)  # and Hydra takes them
    assert list(cfg.data.class_names) == ["background", "liver"] and "noise" not in cfg.transforms.augment
    assert cfg.tracking.experiment == "it's mine" and cfg.paths.data == os.environ["HOME"]


@pytest.mark.parametrize("target,module", [("train", "pipeline.train"), ("sweep", "pipeline.train"),
                                           ("infer", "pipeline.infer"), ("evaluate", "pipeline.evaluate"),
                                           ("promote", "pipeline.promote"), ("data", "pipeline.download"),
                                           ("test", "pytest"), ("test-slow", "pytest")])
def test_args_follow_the_overrides_of_every_target_that_runs_a_command_line(target, module):
    command = make_dry_run(target, "task=Task04_Hippocampus", "ARGS=-k 'a b'")[-1]
    assert hydra_words(command, module)[-3:] == ["task=Task04_Hippocampus", "-k", "a b"], command


def test_make_cv_gives_args_to_its_training_and_their_tracking_overrides_to_its_evaluations():
    train, cv, test = make_dry_run("cv", "data.batch_size=2", "CV_DIR=o/x",
                                   "ARGS=tracking=none 'model.channels=[8, 16]' ~transforms.augment.noise")[-3:]
    assert hydra_words(train, "pipeline.train")[-4:] == ["data.batch_size=2", "tracking=none", "model.channels=[8, 16]",
                                                         "~transforms.augment.noise"], train
    assert hydra_words(cv, "pipeline.evaluate") == ["ckpt=o/x", "split=cv", "output=o/x/cv", "tracking=none"], cv
    assert hydra_words(test, "pipeline.evaluate")[-1] == "tracking=none", test


def test_make_help_lists_every_phony_target_with_its_line_and_is_what_a_bare_make_prints():
    text = (project_root() / "Makefile").read_text().replace("\\\n", " ")
    phony = next(line for line in text.splitlines() if line.startswith(".PHONY:")).split()[1:]
    env = clean_env()
    shown = subprocess.run(["make", "--no-print-directory", "help"], capture_output=True, text=True,
                           cwd=project_root(), env=env, check=True).stdout
    bare = subprocess.run(["make", "--no-print-directory"], capture_output=True, text=True, cwd=project_root(),
                          env=env, check=True).stdout
    lines = {line.split()[0]: line.split(maxsplit=1)[1] for line in shown.splitlines()[1:]}
    assert sorted(lines) == sorted(phony) and len(phony) > 20
    assert all(lines.values()) and bare == shown


@pytest.mark.parametrize("installed,torch,replaced", [
    ("2.13.0+cpu", "cu128", True),     # the CPU build, a CUDA one asked for: pip alone would keep the CPU build
    ("2.13.0+cu128", "cpu", True),
    ("2.13.0", "cu128", True),         # PyPI's own wheel has no local tag
    ("2.13.0+cu128", "cu128", False),  # already that build
    ("2.13.0+cpu", "", False),         # no TORCH: whatever pip's index gave is kept
    (None, "cu128", False),            # no torch yet: nothing to remove
])
def test_make_install_removes_a_torch_build_other_than_the_one_torch_names(tmp_path, installed, torch, replaced):
    """A stand-in .venv whose python answers with the installed torch's version; nothing is installed (dry run)."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\necho {installed}\n" if installed else "#!/bin/sh\nexit 1\n")
    python.chmod(0o755)
    commands = make_dry_run("install", f"VENV={tmp_path / 'venv'}", f"TORCH={torch}")
    uninstall = [i for i, c in enumerate(commands) if " uninstall " in c]
    install = next(i for i, c in enumerate(commands) if "torch==2.13.0" in c)
    assert bool(uninstall) == replaced, commands
    assert all(i < install for i in uninstall)  # removed, then the build asked for installed
    assert re.search(rf"/\.installed-\d+{torch}$", commands[-1]), commands[-1]  # the stamp records the build
    if torch:
        assert commands[install].endswith(f"--index-url https://download.pytorch.org/whl/{torch}")
