"""Logging for every module (`log = logging.getLogger(__name__)`): bare one-line messages on the console, INFO to
stdout and `warning: ...` / `error: ...` to stderr, timestamps in Hydra's job log (<run>/<task>.log); under DDP
only rank 0 speaks (RankZero, as lightning-hydra-template's RankedLogger), except for errors.

Hydra configures the handlers for every entry point (conf/hydra/default.yaml, job_logging). Where nothing configured
logging (tests, benchmarks, notebooks), the `pipeline` logger prints through its own Console handler instead.
"""

import logging
import sys

from tqdm.auto import tqdm

PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}


class RankZero(logging.Filter):
    """Drops records below ERROR on DDP ranks other than 0: one process speaks for the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pipeline import distributed  # imports torch.distributed: only when a record is filtered

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


# A log file on a full or read-only disk must not print a traceback for every record (logging's default, meant for
# development): the write that matters fails as one StorageError line instead (pipeline/files.py).
logging.raiseExceptions = False

_pipeline = logging.getLogger("pipeline")
_pipeline.setLevel(logging.INFO)
if not any(isinstance(h, Console) for h in _pipeline.handlers):
    _pipeline.addHandler(Console(fallback=True))
