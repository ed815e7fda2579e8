"""Logging for every module (`log = logging.getLogger(__name__)`): bare one-line messages on the console, INFO to
stdout and `warning: ...` / `error: ...` to stderr, timestamps in Hydra's job log (<run>/<task>.log); under DDP
only rank 0 speaks (RankZero, as lightning-hydra-template's RankedLogger), except for errors.

Hydra configures the handlers for every entry point (conf/hydra/default.yaml, job_logging). Where nothing configured
logging (tests, benchmarks, notebooks), the `pipeline` logger prints through its own Console handler instead.
"""

import logging
import re
import sys
import warnings

from tqdm.auto import tqdm

PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}


class RankZero(logging.Filter):
    """Drops records below ERROR on DDP ranks other than 0: one process speaks for the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pipeline.core import distributed  # imports torch.distributed: only when a record is filtered

        return record.levelno >= logging.ERROR or distributed.is_main()


class Console(logging.Handler):
    """One bare line per record through tqdm.write (progress bars stay whole): INFO to stdout, warnings and errors,
    prefixed `warning: ` / `error: `, to stderr. `fallback`: emit only while the root logger has no handlers."""

    def __init__(self, level: int = logging.NOTSET, fallback: bool = False):
        super().__init__(level)
        self.fallback = fallback
        self.addFilter(RankZero())

    def emit(self, record: logging.LogRecord) -> None:
        if self.fallback and _root_prints():
            return  # Hydra (or the user) configured logging: the root's handlers print this record
        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            tqdm.write(PREFIX.get(record.levelno, "") + self.format(record), file=stream)
        except Exception:  # logging's contract: a failing handler reports and carries on
            self.handleError(record)


def _root_prints() -> bool:
    """A root handler already prints to the console (pytest's capturing handlers do not count)."""
    streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return any(isinstance(h, Console) or (type(h) is logging.StreamHandler and h.stream in streams)
               for h in logging.getLogger().handlers)


# Third-party lines every run printed that say nothing about it, silenced where they come from by quiet() (the
# entry points call it): (what says it: a warning, from its module, or a log record, from its logger; how it starts;
# why it is harmless). Anything else these libraries say still shows.
HARMLESS = [
    ("log", "monai.data.nvimgcodec_pydicom_plugin", "nvImageCodec is not available",
     "MONAI's GPU DICOM decoder, absent without CUDA's nvImageCodec: pydicom's own decoders read DICOM"),
    ("warning", "monai.data.image_reader", "NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register",
     "the same absence, warned again by the reader every LoadImage builds, whichever reader it then uses"),
    ("warning", "mlflow.data.dataset_source_registry", "The specified dataset source can be interpreted in multiple",
     "MLflow registers its local-file source for `` and `file:`: a data folder matches both, the same class"),
    ("log", "mlflow.pyfunc", "Passing a Python object as `python_model`",
     "the run's model is our serving class, pickled by reference to this package, which it requires"),
    ("warning", "mlflow.pyfunc", "An input example was not provided",
     "the model's signature is given (inference/serving.py); an example volume would add megabytes to every model"),
]


class Drop(logging.Filter):
    """Drops a logger's records whose message starts with `start`."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


_DROPS = {(source, start): Drop(start) for kind, source, start, _ in HARMLESS if kind == "log"}


def quiet() -> None:
    """Silences the HARMLESS lines at their source (each logger, each warning's module and message); idempotent."""
    for kind, source, start, _ in HARMLESS:
        if kind == "log":
            logging.getLogger(source).addFilter(_DROPS[source, start])  # the same filter object: added once
        else:
            # MLflow colours some of its warnings: an ANSI escape may come first
            warnings.filterwarnings("ignore", message=r"(\x1b\[[\d;]*m)?" + re.escape(start), category=UserWarning,
                                    module=re.escape(source) + "$")


# A log file on a full or read-only disk must not print a traceback for every record (logging's default, meant for
# development): the write that matters fails as one StorageError line instead (pipeline/core/files.py).
logging.raiseExceptions = False

_pipeline = logging.getLogger("pipeline")
_pipeline.setLevel(logging.INFO)
if not any(isinstance(h, Console) for h in _pipeline.handlers):
    _pipeline.addHandler(Console(fallback=True))
