"""Shared test settings. Under pytest-xdist (`make test` runs two processes), every worker and each command it
starts computes on one thread: two workers each running two OpenMP threads on two cores oversubscribe them,
and the threads' spin-waits made a detector's training run four times as long."""
import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the CLI subprocesses and torchrun's workers

    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> str:
    """Fashion-MNIST's folder: Debian's dataset-fashion-mnist, or a small stand-in in its idx format."""
    from tests.data_fixtures import HAS_FMNIST, make_fashion_mnist
    from wszoo.training.data import FASHION_MNIST_DIR

    if HAS_FMNIST:
        return FASHION_MNIST_DIR
    return str(make_fashion_mnist(Path(tmp_path_factory.mktemp("fm")), n_train=64, n_test=32))
