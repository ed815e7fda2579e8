"""Writing files so that a crash never leaves a half-written one: temp file in the same folder, then rename."""

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic(path: str | Path):
    """Yield a temporary path beside `path` (same name ending, so writers that pick a format by extension still
    do); on success it is renamed onto `path` in one step, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
