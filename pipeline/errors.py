"""One error type for bad inputs, so entry points can print its one-line message and exit non-zero."""

import sys
from functools import wraps

from omegaconf.errors import MissingMandatoryValue


class InputError(ValueError):
    """A file or setting that cannot be used; the message names the file (or key) and the problem."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message cut to its first line (a library's multi-line report inside our one-line error)."""
    return str(err).strip().splitlines()[0][:limit] if str(err).strip() else type(err).__name__


def faults_error(faults: list[str], root) -> InputError:
    """The first of a dataset's faults, with a pointer to the command that lists them all."""
    more = f" (and {len(faults) - 1} more: python -m pipeline.check data.root={root})" if len(faults) > 1 else ""
    return InputError(faults[0] + more)


def exit_on_input_error(fn):
    """Wrap a Hydra entry point: an InputError becomes `error: <message>` on stderr and exit status 1, no traceback
    (unless the config says debug=true)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        if args and hasattr(args[0], "get") and args[0].get("debug"):
            return fn(*args, **kwargs)  # debug=true: let the traceback through
        try:
            return fn(*args, **kwargs)
        except InputError as err:
            sys.exit(f"error: {err}")
        except MissingMandatoryValue as err:
            sys.exit(f"error: {err.full_key}: required but not set; add {err.full_key}=... to the command")

    return wrapper
