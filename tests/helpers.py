"""Test helpers shared across test modules."""
import torch
import torch.nn as nn


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values (norm affines and gains too) so that every layer matters.

    Conv weights keep their scale; gains (Scaled WS ``gain``, ``skipinit_gain``, often initialised to 0,
    which would hide whole branches) get U(0.5, 1.5); other 1-D parameters (norm scales/biases, biases)
    get N(m, 0.2) around their usual value, so the network stays in a sane numeric range.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if name.endswith("gain"):
            p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype))
        elif p.dim() <= 1:
            base = 1.0 if name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * noise)
        else:
            p.copy_(noise * p.std().clamp_min(1e-3))
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max()).item()


def run_cli(argv, cwd=None):
    """Run ``wszoo ARGV`` in a child process, as the command line would: the real entry point
    (``wszoo.cli.main``), its exit status, what it wrote to stdout and stderr, and whatever it did to the
    file system. The child is forked from the test process (wszoo is already imported there), which saves
    the ~5 s interpreter start of ``python -m wszoo`` per case; it computes on one thread (the parent's
    OpenMP pool does not survive fork). Returns ``(returncode, stdout, stderr)``."""
    import os
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                # the parent's OpenMP threads do not survive fork(): one thread, as DataLoader workers do
                torch.set_num_threads(1)
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                import sys

                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                if cwd is not None:
                    os.chdir(cwd)
                from wszoo.cli import main

                try:
                    code = main(list(argv))
                except SystemExit as e:  # argparse's usage errors
                    code = e.code if isinstance(e.code, int) else 2
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()


def child_log(proc) -> str:
    """Everything a finished child process (``subprocess.run(..., capture_output=True, text=True)``) said, for a
    failed assertion: its exit status and its whole stderr and stdout. A crash's cause is often its first line
    (torchrun's summary of a rank killed by a signal comes after it), so nothing is cut."""
    return f"exit status {proc.returncode}\n--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout}"


def terminal_sigint() -> None:
    """Give a child the disposition a terminal's foreground job has for Ctrl-C (SIGINT): the default. A test
    runner started in the background (a CI job, ``cmd &``) ignores SIGINT, and its children inherit that, so a
    Ctrl-C test would otherwise see a run that cannot be interrupted."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_second_epoch(argv, out, cwd):
    """Run ``python -m wszoo ARGV`` as a user does, wait until its first epoch is committed to ``out`` (a run
    directory), then press Ctrl-C (SIGINT) during the second. Returns ``(returncode, stderr)``."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "wszoo", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=terminal_sigint)
    deadline = time.time() + 240
    while not (out / "train_state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def tree_snapshot(root):
    """Every file under ``root`` with its size and content hash: compare two snapshots to prove a command
    changed nothing (and left nothing half-written)."""
    import hashlib
    from pathlib import Path

    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}



def interrupt_when_logged(argv, marker, cwd, launcher=(), timeout=240):
    """Run ``wszoo ARGV`` as a terminal runs a foreground job, in a process group of its own, and press Ctrl-C
    as soon as it logs a line containing ``marker``: SIGINT goes to the whole group (the wszoo process, its
    DataLoader workers; under a launcher such as torchrun its agent and every worker), as a terminal sends it.
    With no ``launcher`` the run is forked from the test process, as in :func:`run_cli` (no interpreter start,
    one thread); else ``launcher + ['-m', 'wszoo'] + ARGV`` starts in a fresh interpreter (OMP_NUM_THREADS=1).
    Returns ``(returncode, stderr)``."""
    import os
    import signal
    import subprocess
    import threading

    read_end, write_end = os.pipe()
    if launcher:
        proc = subprocess.Popen([*launcher, "-m", "wszoo", *argv], stdout=subprocess.DEVNULL, stderr=write_end,
                                cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                                preexec_fn=terminal_sigint)
        pid, wait = proc.pid, proc.wait
    else:
        pid = os.fork()
        wait = lambda: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])  # noqa: E731
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.close(read_end)
                os.setsid()
                signal.signal(signal.SIGINT, signal.default_int_handler)  # as terminal_sigint, in this process
                torch.set_num_threads(1)
                os.dup2(write_end, 2)
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                import sys

                sys.stdout, sys.stderr = os.fdopen(1, "w", buffering=1), os.fdopen(2, "w", buffering=1)
                os.chdir(cwd)
                import logging

                logging.root.handlers.clear()  # pytest's capture handlers: the CLI's own logging set-up applies
                from wszoo.cli import main

                code = main(list(argv))
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(write_end)
    killer = threading.Timer(timeout, os.killpg, (pid, signal.SIGKILL))
    killer.start()
    lines, pressed = [], False
    try:
        with os.fdopen(read_end) as stderr:
            for line in stderr:
                lines.append(line)
                if not pressed and marker in line:
                    os.killpg(pid, signal.SIGINT)
                    pressed = True
        returncode = wait()
    finally:
        killer.cancel()
    err = "".join(lines)
    assert pressed, f"the run never logged {marker!r}:\n{err[-3000:]}"
    return returncode, err
