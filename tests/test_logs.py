"""Console logging: bare lines, warnings and errors on stderr with their prefix, rank 0 only under DDP."""

import contextlib
import logging
import re
import warnings

import pytest

from pipeline.core import distributed, logs

log = logging.getLogger("pipeline.test_logs")


def test_console_lines_are_bare_and_warnings_and_errors_go_to_stderr_with_their_prefix(capsys):
    log.info("plan from 8 training cases")
    log.warning("careful")
    log.error("/data/x.nii.gz: unreadable")
    out, err = capsys.readouterr()
    assert out == "plan from 8 training cases\n"
    assert err == "warning: careful\nerror: /data/x.nii.gz: unreadable\n"


def test_ranks_other_than_zero_log_errors_only(monkeypatch, capsys):
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    log.info("epoch   1  loss 0.5")
    log.warning("careful")
    log.error("rank 1 failed")
    out, err = capsys.readouterr()
    assert out == "" and err == "error: rank 1 failed\n"


class Heard(logging.Handler):
    """Every record a logger passes on (after its own filters), and every warning, said inside `hearing`."""

    def __init__(self):
        super().__init__()
        self.records, self.warnings = [], []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())

    def said(self, start: str) -> bool:
        uncoloured = [re.sub(r"^\x1b\[[\d;]*m", "", str(w.message)) for w in self.warnings]
        return any(m.startswith(start) for m in self.records + uncoloured)


@contextlib.contextmanager
def hearing(quiet: bool):
    """Warnings always shown and the HARMLESS loggers listened to; with `quiet`, logs.quiet() first."""
    heard, loggers = Heard(), {logging.getLogger(source) for _, source, _, _ in logs.HARMLESS}
    for logger in loggers:
        logger.addHandler(heard)
    try:
        with warnings.catch_warnings(record=True) as caught:  # the filters quiet() adds go with the block
            warnings.simplefilter("always")
            if quiet:
                logs.quiet()
            yield heard
            heard.warnings = caught
    finally:
        for logger in loggers:
            logger.removeHandler(heard)
            for drop in logs._DROPS.values():
                logger.removeFilter(drop)


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_silences_each_harmless_line_at_its_source_and_nothing_else(quiet):
    """Each HARMLESS line said as its library says it (MLflow colours some warnings), beside an unrelated warning and
    an unrelated log record from the same module: only the named lines go, and only once quiet() ran."""
    with hearing(quiet) as heard:
        for kind, source, start, _ in logs.HARMLESS:
            if kind == "log":
                logging.getLogger(source).warning(f"{start}; more")
                logging.getLogger(source).warning(f"unrelated record of {source}")
            else:
                for text in (f"{start}; more", f"\x1b[1;33m{start}; more\x1b[0m"):
                    warnings.warn_explicit(text, UserWarning, f"{source}.py", 1, module=source)
                warnings.warn_explicit(f"unrelated warning of {source}", UserWarning, f"{source}.py", 2, module=source)
    starts = [start for _, _, start, _ in logs.HARMLESS]
    assert [start for start in starts if heard.said(start)] == ([] if quiet else starts)
    sources = {kind: [source for k, source, _, _ in logs.HARMLESS if k == kind] for kind in ("log", "warning")}
    assert all(heard.said(f"unrelated record of {source}") for source in sources["log"])
    assert all(heard.said(f"unrelated warning of {source}") for source in sources["warning"])
    assert len(heard.warnings) == len(sources["warning"]) * (1 if quiet else 3)


def test_quiet_silences_what_monai_and_mlflow_really_say_in_a_run(tmp_path):
    """The libraries themselves: MONAI's LoadImage, MLflow's dataset source for a data folder and the run's pyfunc
    model saved as pipeline/inference/serving.py logs it."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from monai.transforms import LoadImage

    from pipeline.inference.serving import SIGNATURE, SegmentationModel

    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")

    def run(folder):
        LoadImage(reader="NibabelReader")
        resolve_dataset_source(str(tmp_path))
        mlflow.pyfunc.save_model(folder, python_model=SegmentationModel(), artifacts={"checkpoint": str(checkpoint)},
                                 signature=SIGNATURE, pip_requirements=["torch"])

    with hearing(quiet=False) as loud:
        run(tmp_path / "loud")
    with hearing(quiet=True) as quieted:
        run(tmp_path / "quiet")
    said = [start for _, _, start, _ in logs.HARMLESS if loud.said(start)]
    # the nvImageCodec lines only where its CUDA decoder is missing; the MLflow ones everywhere
    assert {"The specified dataset source can be interpreted in multiple", "Passing a Python object as `python_model`",
            "An input example was not provided"} <= set(said)
    assert not [start for _, _, start, _ in logs.HARMLESS if quieted.said(start)]
