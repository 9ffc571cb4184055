"""Writing files so that a reader never sees half of one: everything is written to a temporary file in the
target's directory and renamed over the target (``os.replace`` is atomic on POSIX and Windows), so an
interrupted write leaves the old file, or none, never a truncated one."""
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_path", "atomic_write_text", "check_writable_parent"]

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on a normal exit it replaces ``path``, on an error it is removed."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def check_writable_parent(path: PathLike, what: str) -> None:
    """Raise a ValueError naming ``what`` unless ``path``'s directory exists and can be written to: checked
    before any work, so a typo in an output path costs nothing."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise ValueError(f"{what} {os.fspath(path)!r}: the directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{what} {os.fspath(path)!r}: the directory {str(parent)!r} is not writable")
