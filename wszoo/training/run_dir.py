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
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from safetensors.torch import save_file

from ..checkpoint import read_safetensors
from ..errors import Fix, FixableError, UsageError

__all__ = ["RunDirectory", "RUN_ITEMS", "deferred_interrupts", "check_output", "save_train_state",
           "load_train_state", "TrainingInterrupted", "TrainingDiverged", "interruption", "resume_fix"]

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


def resume_fix(run_dir: os.PathLike) -> Fix:
    """The ``resume`` argument (``--resume DIR``) that continues the run in ``run_dir``."""
    return Fix("resume", repr(str(run_dir)), cli_value=str(run_dir))


def check_output(output: os.PathLike, resume: Optional[os.PathLike], overwrite: bool) -> RunDirectory:
    """``output`` may not silently replace a run: it must be new, the run being resumed, or ``overwrite``
    must say so. Its nearest existing folder must be writable (it is made on the first commit)."""
    out = RunDirectory(output)
    output_fix = Fix("output", repr(str(out.path)), cli_value=str(out.path))
    if out.path.exists() and not out.path.is_dir():
        raise UsageError("{output} is a file, not a directory", output_fix)
    resuming_here = resume is not None and Path(resume).resolve() == out.path.resolve()
    if out.holds_run() and not resuming_here and not overwrite:
        state = out.state() or {}
        done = f" (epochs 0..{state['epoch']} of {state.get('model', '?')})" if "epoch" in state else ""
        raise UsageError(f"{{output}} already holds a training run{done}; pass {{resume}} to continue it, or "
                         "{overwrite} to replace it", output_fix, resume_fix(out.path), Fix("overwrite", "True"))
    existing = next(p for p in (out.path, *out.path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"{{output}}: {existing} is not a writable directory", output_fix)
    return out


def save_train_state(out: Path, optimizer: torch.optim.Optimizer, scheduler: Any, meta: Dict[str, Any],
                     tensors: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """``train_state.safetensors`` (the optimizer's tensors, and ``tensors`` such as EMA weights) and
    ``train_state.json`` (``meta``, the optimizer's other state and the scheduler's): resuming never
    unpickles anything."""
    sd = optimizer.state_dict()
    saved = {k: v.detach().contiguous().cpu() for k, v in (tensors or {}).items()}
    state: Dict[str, Dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        state[str(pid)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                saved[f"optimizer.{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                state[str(pid)][key] = value
    save_file(saved, str(out / "train_state.safetensors"))
    full = {**meta, "param_groups": sd["param_groups"], "state": state, "scheduler": scheduler.state_dict()}
    (out / "train_state.json").write_text(json.dumps(full, indent=1, default=float))


def load_train_state(src: Path, optimizer: torch.optim.Optimizer, scheduler: Any,
                     check: Optional[Callable[[Dict[str, Any]], None]] = None
                     ) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Restore the optimizer and scheduler from ``src`` (after ``check(meta)`` refused nothing); returns the
    run's meta and its other saved tensors (EMA weights ...). Errors name the file and what is wrong."""
    meta = RunDirectory(src).state()
    if meta is None:
        raise UsageError("{resume}: no train_state.json there (not a wszoo training output?)", resume_fix(src))
    if check is not None:
        check(meta)
    tensors = read_safetensors(str(src / "train_state.safetensors"))
    state: Dict[int, Dict[str, Any]] = {int(pid): dict(v) for pid, v in meta["state"].items()}
    others = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state[int(pid)][name] = value
        else:
            others[key] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as e:
        raise UsageError(f"{{resume}}: the optimizer state does not fit this model and optimizer ({e})",
                         resume_fix(src)) from e
    scheduler.load_state_dict(meta["scheduler"])
    return meta, others


class TrainingInterrupted(FixableError, RuntimeError):
    """Ctrl-C during training; the message says what was saved and how to resume."""


class TrainingDiverged(FixableError, RuntimeError):
    """The loss or the weights became NaN/Inf: the run stops, and the diverged epoch is not saved."""


def interruption(epoch: int, resumable: Optional[Tuple[Path, int]], out: Optional[RunDirectory] = None
                 ) -> TrainingInterrupted:
    """The error for Ctrl-C during ``epoch``: where the last complete epoch is (``(run_dir, last_epoch)``,
    ``None`` when no epoch was ever complete) and the argument that resumes from it. ``out``, the run's
    directory, is asked too: a Ctrl-C held back while an epoch was committed arrives after the commit, before
    the loop could record it, and what is on disk is the truth."""
    state = out.state() if out is not None else None
    if state is not None and "epoch" in state and (resumable is None or int(state["epoch"]) > resumable[1]):
        resumable = (out.path, int(state["epoch"]))
    if resumable is None:
        return TrainingInterrupted(f"interrupted during epoch {epoch}; no epoch was complete, nothing is saved")
    where, done = resumable
    when = f"after epoch {epoch} was saved" if done >= epoch else f"during epoch {epoch}"
    return TrainingInterrupted(f"interrupted {when}; {where} holds epochs 0..{done}: resume with the "
                               "same command and {resume}", resume_fix(where))
