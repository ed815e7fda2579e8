"""Every command the README and docs/ give is one that works: each fenced shell block's and each quoted command's
`make` targets exist, its Hydra overrides compose, its scripts and their flags exist; the README's quickstart runs end
to end."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from pipeline import project_root
from pipeline.core.config import compose
from pipeline.core.rundir import RunDir
from pipeline.models import checkpoint

ROOT = project_root()
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
# make targets -> the config their key=value arguments compose into (None: they take no Hydra keys)
TARGET_CONFIG = {"train": "train", "cv": "train", "sweep": "train", "infer": "infer", "evaluate": "evaluate",
                 "data": "download", "promote": "promote"}
MODULE_CONFIG = {"train": "train", "check": "train", "infer": "infer", "evaluate": "evaluate", "export": "export",
                 "download": "download", "promote": "promote"}
# make's own variables, not Hydra keys: the Makefile's MAKE_VARS line, read rather than repeated
MAKE_VARS = set(re.search(r"^MAKE_VARS := (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split())


def shell_commands(page: Path) -> list[tuple[int, str]]:
    """(line number, command) of every ```bash block, continuation lines joined."""
    text, found = page.read_text(), []
    for block in re.finditer(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        start = text[: block.start()].count("\n") + 2
        for offset, command in enumerate(re.sub(r"\\\n\s*", " ", block.group(1)).splitlines()):
            if command.strip() and not command.lstrip().startswith("#"):
                found.append((start + offset, command))
    return found


# a command quoted in prose: a make target, an entry point or a benchmark (records name old recipes in words instead)
INLINE = re.compile(r"`((?:make [a-z]|python -m pipeline\.[a-z]|\.venv/bin/python (?:-m pipeline\.[a-z]|bench/))"
                    r"[^`]*)`")


def inline_commands(page: Path) -> list[tuple[int, str]]:
    """(line number, command) of every command quoted in the page's prose, outside its fenced blocks."""
    fenced = re.compile(r"^```.*?^```", flags=re.M | re.S)
    text = fenced.sub(lambda m: "\n" * m.group(0).count("\n"), page.read_text())  # blanked, the line numbers kept
    return [(text[: m.start()].count("\n") + 1, " ".join(m.group(1).split())) for m in INLINE.finditer(text)]


COMMANDS = [(page, line, command) for page in PAGES
            for line, command in [*shell_commands(page), *inline_commands(page)]]


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def composes(config: str, overrides: list[str]) -> None:
    """Compose with the overrides; a sweep's comma list or range is composed one value at a time."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    compose(config, plain)
    for o in parsed:
        if o.is_sweep_override():
            for value in o.sweep_string_iterator():
                compose(config, [*plain, f"{o.get_key_element()}={value}"])


def hydra_arguments(tokens: list[str]) -> list[str]:
    """The key=value tokens, without placeholders such as `[key=value ...]` and make's own variables; a placeholder
    in a value (`<time>`, which the user replaces) as a plain word."""
    return [re.sub(r"<(\w+)>", r"\1", t) for t in tokens if "=" in t and not t.startswith(("-", "["))
            and t.split("=", 1)[0] not in MAKE_VARS and not t.endswith("...]")]


def test_the_docs_give_commands_to_check():
    assert len(COMMANDS) > 140 and any(page.name == "README.md" for page, _, _ in COMMANDS)
    assert sum(len(inline_commands(page)) for page in PAGES) > 90  # those quoted in prose too


@pytest.mark.parametrize("page,line,command", COMMANDS,
                         ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _ in COMMANDS])
def test_a_documented_command_names_real_targets_scripts_and_keys(page, line, command):
    tokens = shlex.split(command, comments=True)
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # environment assignments before the command
        tokens = tokens[1:]
    if not tokens:
        return
    if tokens[0] == "make":
        target = tokens[1] if len(tokens) > 1 and "=" not in tokens[1] else "help"  # make's default goal: help
        assert target in make_targets(), f"make {target}: no such target"
        keys = hydra_arguments(tokens[2:] if "=" not in tokens[1] else tokens[1:])
        if target == "data" and not any(k.startswith("task=") for k in keys):
            return  # the demo phantoms: no keys
        if keys:
            assert target in TARGET_CONFIG, f"make {target} takes no Hydra keys: {keys}"
            composes(TARGET_CONFIG[target], keys)
    elif "-m" in tokens and (module := tokens[tokens.index("-m") + 1]).startswith("pipeline."):
        name = module.removeprefix("pipeline.")
        assert name in MODULE_CONFIG, f"python -m {module}: no such entry point"
        composes(MODULE_CONFIG[name], hydra_arguments(tokens[tokens.index("-m") + 2:]))
    elif any(t.startswith("bench/") for t in tokens):
        script = ROOT / next(t for t in tokens if t.startswith("bench/"))
        assert script.is_file(), f"{script}: no such benchmark"
        for flag in (t for t in tokens if t.startswith("--")):
            assert f'"{flag}"' in script.read_text(), f"{script.name} has no {flag}"


def test_the_readme_quickstart_runs_train_infer_evaluate(tiny_phantom, tmp_path):
    """The README's quickstart block as a new user runs it, with one epoch on the small phantom set: each `make`
    step as the python -m it runs, `<time>` the folder the training step made."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quickstart"):]
    block = re.search(r"^```bash\n(.*?)^```", section, flags=re.M | re.S).group(1)
    steps = [shlex.split(c, comments=True) for c in block.splitlines() if c.strip() and not c.startswith("#")]
    assert [s[:2] for s in steps] == [["make", "train"], ["make", "infer"], ["make", "evaluate"],
                                      ["make", "mlflow-ui"]], steps
    run = tmp_path / "outputs" / "runs" / "train" / "quickstart"
    fixed = {"train": [f"data.root={tiny_phantom}", "trainer.max_epochs=1", "data.cache=none", f"hydra.run.dir={run}",
                       f"paths.outputs={tmp_path / 'outputs'}"],
             "infer": [f"hydra.run.dir={tmp_path / 'infer'}"], "evaluate": [f"hydra.run.dir={tmp_path / 'evaluate'}"]}
    for step in steps[:3]:
        args = [a.replace("outputs/runs/train/<time>", str(run)).replace("data/phantom", str(tiny_phantom))
                .replace("outputs/predictions", str(tmp_path / "predictions")) for a in step[2:]]
        done = subprocess.run([sys.executable, "-m", f"pipeline.{step[1]}", *args, *fixed[step[1]]], cwd=tmp_path,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(step)}:\n{done.stderr[-2000:]}"
    assert checkpoint.load(RunDir(run).best)["epoch"] == 1
    assert list((tmp_path / "predictions").glob("*.nii.gz")), "make infer wrote no label map"
    assert json.loads((tmp_path / "evaluate" / "summary.json").read_text())["cases"] >= 1
    assert "mlflow-ui" in make_targets()


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, as GitHub and MkDocs make them."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", page.read_text(), flags=re.M)}


@pytest.mark.parametrize("page", ["README.md", "CONTRIBUTING.md", "CHANGELOG.md"])
def test_the_top_level_pages_link_files_and_headings_that_exist(page):
    """mkdocs build --strict checks docs/; these pages live outside it."""
    source = ROOT / page
    for target in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", source.read_text()):
        path, anchor = target
        if path.startswith(("http://", "https://")):
            continue
        linked = (source.parent / path) if path else source
        assert linked.exists(), f"{page}: a link to {path}, which does not exist"
        if anchor:
            assert anchor in anchors(linked), f"{page}: a link to {path}#{anchor}, which is no heading there"
