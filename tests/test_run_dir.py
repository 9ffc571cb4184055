"""A run directory's epochs land as one unit: a stop at any instant leaves the previous epoch or the new one."""
import json
import os
import signal

import pytest

from tests.helpers import tree_snapshot
from wszoo.training.run_dir import RunDirectory, deferred_interrupts


def epoch_writer(epoch, with_ema=True, fail_after=None):
    """A write callback producing a fake epoch; ``fail_after`` raises once that many items are written."""

    def write(stage):
        items = [("metrics.jsonl", "\n".join(f'{{"epoch": {e}}}' for e in range(epoch + 1)) + "\n"),
                 ("last", f"weights of epoch {epoch}"), ("train_state.json", f'{{"epoch": {epoch}}}')]
        if with_ema:
            items.append(("ema", f"ema of epoch {epoch}"))
        for i, (name, text) in enumerate(items):
            if fail_after is not None and i == fail_after:
                raise KeyboardInterrupt
            if name in ("last", "ema"):
                (stage / name).mkdir()
                (stage / name / "model.safetensors").write_text(text)
            else:
                (stage / name).write_text(text)

    return write


def committed_epoch(run):
    return run.state()["epoch"], (run.path / "last" / "model.safetensors").read_text(), len(run.metrics())


def test_each_commit_replaces_the_epoch_whole(tmp_path):
    run = RunDirectory(tmp_path / "run")
    assert not run.holds_run()
    run.commit(epoch_writer(0))
    run.commit(epoch_writer(1))
    assert run.holds_run()
    assert committed_epoch(run) == (1, "weights of epoch 1", 2)
    assert sorted(p.name for p in run.path.iterdir()) == ["ema", "last", "metrics.jsonl", "train_state.json"]


def test_an_interrupted_write_leaves_the_previous_epoch(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.commit(epoch_writer(0))
    before = tree_snapshot(run.path)
    with pytest.raises(KeyboardInterrupt):
        run.commit(epoch_writer(1, fail_after=2))  # last/ and metrics written, train_state not
    run.recover()
    assert tree_snapshot(run.path) == before


@pytest.mark.parametrize("moved", [0, 1, 2, 3])
def test_a_commit_stopped_while_moving_is_finished_on_recovery(tmp_path, monkeypatch, moved):
    """A kill between the renames of the apply step: recovery completes the new epoch (never a mix)."""
    run = RunDirectory(tmp_path / "run")
    run.commit(epoch_writer(0))
    real_rename, calls = os.rename, []

    def dying_rename(src, dst):
        calls.append(src)
        if len(calls) > moved + 1:  # the first rename is .pending -> .commit: the epoch counts from there
            raise SystemExit("killed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", dying_rename)
    with pytest.raises(SystemExit):
        run.commit(epoch_writer(1))
    monkeypatch.setattr(os, "rename", real_rename)
    RunDirectory(run.path).recover()
    assert committed_epoch(run) == (1, "weights of epoch 1", 2)
    assert not any(p.name.startswith(".") for p in run.path.iterdir())


def test_replace_all_removes_what_the_new_run_does_not_write(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.commit(epoch_writer(3))
    (run.path / "notes.txt").write_text("mine")  # not a run item: never touched
    run.commit(epoch_writer(0, with_ema=False), replace_all=True)
    assert sorted(p.name for p in run.path.iterdir()) == ["last", "metrics.jsonl", "notes.txt", "train_state.json"]
    assert committed_epoch(run) == (0, "weights of epoch 0", 1)


def test_ctrl_c_during_the_move_is_held_until_the_epoch_is_in_place(tmp_path, monkeypatch):
    run = RunDirectory(tmp_path / "run")
    run.commit(epoch_writer(0))
    real_rename = os.rename

    def rename_then_interrupt(src, dst):
        real_rename(src, dst)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives in the middle of the move

    monkeypatch.setattr(os, "rename", rename_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run.commit(epoch_writer(1))
    monkeypatch.setattr(os, "rename", real_rename)
    assert committed_epoch(run) == (1, "weights of epoch 1", 2)
    assert not (run.path / ".commit").exists()


def test_deferred_interrupts_restore_the_handler():
    handler = signal.getsignal(signal.SIGINT)
    with deferred_interrupts():
        pass
    assert signal.getsignal(signal.SIGINT) is handler


def test_ctrl_c_after_a_commit_reports_what_is_on_disk(tmp_path):
    """Ctrl-C held back during an epoch's commit arrives after it, before the loop records the epoch: the message
    must name the epoch on disk, not the one before."""
    from wszoo.training.run_dir import interruption

    out = RunDirectory(tmp_path / "run")
    assert "no epoch was complete" in str(interruption(0, None, out))  # nothing on disk yet
    out.commit(lambda stage: (stage / "train_state.json").write_text(json.dumps({"epoch": 0})))
    assert str(interruption(0, None, out)).startswith(f"interrupted after epoch 0 was saved; {out.path} holds "
                                                      "epochs 0..0")
    assert str(interruption(1, (out.path, 0), out)).startswith(f"interrupted during epoch 1; {out.path} holds "
                                                               "epochs 0..0")
    resumed_from = tmp_path / "older"  # a resumed run whose new directory is still empty: the old one counts
    assert f"{resumed_from} holds epochs 0..4" in str(interruption(5, (resumed_from, 4), RunDirectory(tmp_path / "x")))
