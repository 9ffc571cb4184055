"""Shared test settings. Under pytest-xdist (`make test` runs two processes), every worker and each command it
starts computes on one thread: two workers each running two OpenMP threads on two cores oversubscribe them,
and the threads' spin-waits made a detector's training run four times as long."""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the CLI subprocesses and torchrun's workers

    import torch

    torch.set_num_threads(1)
