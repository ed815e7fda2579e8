"""Writing files so that a crash never leaves a half-written one (temp file in the same folder, then rename), and a
full, read-only or forbidden disk is one line naming the path, the problem and the free space."""

import errno
import os
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path

from pipeline.core.errors import RunStopped

# The OS errors that come from the storage rather than from the data written.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
FULL = 1 << 20  # under 1 MiB free when a write failed: the disk was full, whatever the writer's exception says


class StorageError(RunStopped):
    """A write the storage refused (no space, read-only, no permission): `<path>: <problem>; <free> free on <mount>`.
    Every file written through `atomic` is either whole or absent after it."""

    @classmethod
    def at(cls, path: str | Path, problem: str) -> "StorageError":
        return cls(f"{path}: {problem}; {megabytes(free_bytes(path))} free on {mount_point(path)}")


def _existing(path: str | Path) -> Path:
    """`path`, or its nearest parent that exists (a folder a write is about to create)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    return shutil.disk_usage(_existing(path)).free


def mount_point(path: str | Path) -> Path:
    path = _existing(path)
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def storage_problem(err: BaseException, folder: Path) -> str | None:
    """What the storage did wrong, or None when the failure is not the storage's. Writers that report a full disk
    without its errno (torch.save to a path, SimpleITK) are recognised by the free space left at the failure."""
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        return os.strerror(err.errno).lower()
    if isinstance(err, (OSError, RuntimeError)) and free_bytes(folder) < FULL:
        return "no space left on device"
    return None


@contextmanager
def atomic(path: str | Path):
    """Yield a temporary path beside `path` (same name ending, so writers that pick a format by extension still
    do); on success it is renamed onto `path` in one step, on failure removed. A storage fault becomes a
    StorageError; `path` keeps its previous content."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except Exception as err:
        problem = storage_problem(err, path.parent)  # while the partial file still fills the disk
        _remove(tmp)  # before measuring: the free space the user has, without our partial file
        if problem is None:
            raise
        raise StorageError.at(path, problem) from err
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    with suppress(OSError):  # absent, or in a folder we may not write: nothing of ours to remove
        path.unlink(missing_ok=True)


@contextmanager
def appending(path: str | Path):
    """A text file opened for appending (a log of lines, where a lost last line is no harm; created if missing); a
    storage fault becomes a StorageError."""
    path = Path(path)
    with storage_faults(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            yield f


def ensure_writable(path: str | Path) -> None:
    """Create `path` if missing (an empty file) and check it can be written, or raise a StorageError."""
    path = Path(path)
    with storage_faults(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        if not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


@contextmanager
def storage_faults(path: Path):
    """An OSError of the storage that holds `path` (full, read-only, no permission) becomes a StorageError naming
    `path`; any other error passes unchanged."""
    try:
        yield
    except OSError as err:
        if (problem := storage_problem(err, path.parent)) is None:
            raise
        raise StorageError.at(path, problem) from err
