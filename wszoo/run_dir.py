"""A fine-tuning run's output directory, where each epoch's checkpoint lands as one unit.

Layout: ``last/``, ``best/`` and ``ema/`` (``save_pretrained`` directories), ``train_state.json`` +
``train_state.safetensors`` (optimizer, scheduler, EMA, epoch) and ``metrics.jsonl``. An epoch is first
written whole into ``.pending/``, which is then renamed to ``.commit/`` (the atomic step: from here on the
epoch counts) and moved into place item by item. A run stopped at any instant (Ctrl-C, a kill, a power
cut) therefore shows either the previous epoch or the new one, never a mix: an unfinished ``.pending/`` is
discarded and an unfinished ``.commit/`` is completed the next time the directory is opened.
"""
import contextlib
import json
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

__all__ = ["RunDirectory", "RUN_ITEMS", "deferred_interrupts"]

#: What a run directory holds; nothing else in it is ever touched.
RUN_ITEMS = ("last", "best", "ema", "train_state.json", "train_state.safetensors", "metrics.jsonl")
_PENDING, _COMMIT, _OLD_PREFIX = ".pending", ".commit", ".old-"


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block is done, then raise it: a checkpoint is never half-moved by it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class RunDirectory:
    """The output directory of ``wszoo finetune``; see the module docstring for the commit protocol."""

    def __init__(self, path: os.PathLike) -> None:
        self.path = Path(path)

    def holds_run(self) -> bool:
        """True if any run item (or an epoch being committed) is there."""
        names = RUN_ITEMS + (_PENDING, _COMMIT)
        return self.path.is_dir() and any((self.path / n).exists() for n in names)

    def recover(self) -> None:
        """Finish an epoch whose commit was interrupted; drop one that was never committed."""
        if not self.path.is_dir():
            return
        if (self.path / _COMMIT).is_dir():
            self._apply()
        if (self.path / _PENDING).exists():
            shutil.rmtree(self.path / _PENDING)
        for old in self.path.glob(_OLD_PREFIX + "*"):
            shutil.rmtree(old) if old.is_dir() else old.unlink()

    def state(self) -> Optional[Dict[str, Any]]:
        """``train_state.json`` of the last committed epoch, or ``None``."""
        path = self.path / "train_state.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not readable JSON ({e}): this run cannot be resumed") from e

    def metrics(self) -> List[str]:
        """The committed ``metrics.jsonl`` lines."""
        path = self.path / "metrics.jsonl"
        return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []

    def commit(self, write: Callable[[Path], None], replace_all: bool = False) -> None:
        """Write an epoch with ``write(staging_dir)`` (any subset of :data:`RUN_ITEMS`), then make it the
        directory's state in one step. ``replace_all`` also removes the run items ``write`` did not write
        (starting over with ``--overwrite``). Ctrl-C is held back while the epoch is moved into place."""
        self.path.mkdir(parents=True, exist_ok=True)
        pending = self.path / _PENDING
        if pending.exists():
            shutil.rmtree(pending)
        pending.mkdir()
        write(pending)
        unknown = sorted(p.name for p in pending.iterdir() if p.name not in RUN_ITEMS)
        if unknown:
            raise RuntimeError(f"not run items: {unknown}")
        if replace_all:  # an empty marker per item to remove: the apply step deletes those
            for name in RUN_ITEMS:
                if not (pending / name).exists() and (self.path / name).exists():
                    (pending / (name + ".delete")).touch()
        with deferred_interrupts():
            os.rename(pending, self.path / _COMMIT)  # the epoch counts from here on
            self._apply()

    def _apply(self) -> None:
        """Move every item of ``.commit/`` into place; safe to run again after an interruption."""
        commit = self.path / _COMMIT
        for item in sorted(commit.iterdir()):
            if item.name.endswith(".delete"):
                _remove(self.path / item.name[: -len(".delete")])
                item.unlink()
                continue
            dest = self.path / item.name
            if item.is_dir():
                if dest.exists():
                    old = self.path / (_OLD_PREFIX + item.name)
                    _remove(old)
                    os.rename(dest, old)
                os.rename(item, dest)
            else:
                os.replace(item, dest)
        for old in self.path.glob(_OLD_PREFIX + "*"):
            _remove(old)
        commit.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
