"""One error type for bad inputs, so entry points can print its one-line message and exit non-zero."""

import logging
import os
import sys
from functools import wraps

from omegaconf.errors import MissingMandatoryValue


class InputError(ValueError):
    """A file or setting that cannot be used; the message names the file (or key) and the problem."""


class RunStopped(Exception):
    """A run that stops for a reason it states in one line (a NaN loss, an interrupt): the entry point prints the
    message and exits with `code` (1; 128 + the signal number for an interrupt)."""

    def __init__(self, message: str, code: int = 1, prefix: str = "error: "):
        super().__init__(message)
        self.code, self.prefix = code, prefix


def first_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message cut to its first line (a library's multi-line report inside our one-line error)."""
    return str(err).strip().splitlines()[0][:limit] if str(err).strip() else type(err).__name__


def faults_error(faults: list[str], root) -> InputError:
    """The first of a dataset's faults, with a pointer to the command that lists them all."""
    more = f" (and {len(faults) - 1} more: python -m pipeline.check data.root={root})" if len(faults) > 1 else ""
    return InputError(faults[0] + more)


# What to lower when memory runs out: the batch and patch in training, the window batch and stitching at inference.
MEMORY_ADVICE = ("lower data.batch_size or data.patch_size (training), sw_batch_size or set stitch_device=cpu "
                 "(inference)")


def out_of_memory(err: BaseException) -> bool:
    """CUDA's torch.OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    return (type(err).__name__ in ("OutOfMemoryError", "MemoryError")
            or "not enough memory" in str(err) or "out of memory" in str(err).lower())


def log_traceback(err: BaseException) -> str | None:
    """`err`'s traceback written to the run's log file only (Hydra's `<run>/<task>.log`), as lightning-hydra-template's
    task wrapper keeps it: a crashed run is diagnosed from its folder, not re-run. Returns that file, None without
    one."""
    files = [h for h in logging.getLogger().handlers
             if isinstance(h, logging.FileHandler) and h.baseFilename != os.devnull]  # (pytest's null log)
    record = logging.LogRecord("pipeline", logging.ERROR, __file__, 0, f"{type(err).__name__}: {err}", None,
                               (type(err), err, err.__traceback__))
    for handler in files:
        handler.handle(record)
    return files[0].baseFilename if files else None


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def exit_on_input_error(fn):
    """Wrap a Hydra entry point: an InputError becomes `error: <message>` on stderr and exit status 1, no traceback;
    out of memory one line with what to lower; any other error (a bug) its type and first line, exit 1, its traceback
    in the run's log file. The config's debug=true lets every traceback through."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        if args and hasattr(args[0], "get") and args[0].get("debug"):
            return fn(*args, **kwargs)  # debug=true: let the traceback through
        try:
            return fn(*args, **kwargs)
        except InputError as err:
            sys.exit(f"error: {err}")
        except RunStopped as err:
            print(f"{err.prefix}{err}", file=sys.stderr)
            sys.exit(err.code)
        except MissingMandatoryValue as err:
            sys.exit(f"error: {err.full_key}: required but not set; add {err.full_key}=... to the command")
        except Exception as err:  # not an input fault: stop with its message, not per file or as a traceback
            if _multirun():
                raise  # a sweep records the job as failed and goes on (Hydra's launcher, Optuna's trial states)
            where = log_traceback(err)
            if out_of_memory(err):
                sys.exit(f"error: out of memory ({first_line(err)}); {MEMORY_ADVICE}")
            shown = f"traceback in {where}" if where else "debug=true shows the traceback"
            sys.exit(f"error: {type(err).__name__}: {first_line(err)} ({shown})")

    return wrapper
