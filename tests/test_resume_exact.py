"""A run stopped with Ctrl-C and resumed ends exactly where the same command left alone ends: the same weights,
EMA, best/, optimizer and schedule state, bit for bit, and the same metrics.jsonl but for how long each epoch
took. ``wszoo finetune`` (micro-batches, EMA, AGC, timm's augmentation, dropout), ``wszoo detect train``
(flip augmentation, micro-batches) and ``wszoo segment train`` (random rescale/flip/crop, mIoU picking best/),
in one process and under torchrun, with and without DataLoader workers."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import wszoo.detection.training  # noqa: F401  (imported once here: the runs forked from this process start warm)
import wszoo.segmentation.training  # noqa: F401
import wszoo.training  # noqa: F401
from tests.data_fixtures import make_coco_shapes, make_fashion_mnist, make_voc_segmentation
from tests.helpers import interrupt_when_logged, run_cli

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
#: What may differ between two runs of the same training: the seconds each epoch's parts took.
TIMING_FIELDS = ("train_seconds", "val_seconds")
# Ctrl-C lands in epoch 1 after its third micro-batch: mid-epoch, with half of an optimizer step accumulated
STOP_IN_SECOND_EPOCH = "epoch 1  batch 3/"


def _train(argv, launcher):
    if launcher:
        proc = subprocess.run([*launcher, "-m", "wszoo", *argv], capture_output=True, text=True, timeout=300,
                              cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        code, _, err = run_cli(argv, cwd=REPO)
        assert code == 0, err[-3000:]


def _contents(run_dir):
    """Every file's bytes, but a safetensors file's tensors (name, dtype, shape, bytes) and metadata: its header
    lists the metadata in another order in each process (a Rust hash map), whatever the weights."""
    contents = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name != "metrics.jsonl"):
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                contents[str(path.relative_to(run_dir))] = (f.metadata(), {
                    k: (t.dtype, t.shape, hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest())
                    for k in f.keys() for t in [f.get_tensor(k)]})
        else:
            contents[str(path.relative_to(run_dir))] = path.read_bytes()
    return contents


def _rows_without_timing(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(set(TIMING_FIELDS) & set(row) for row in rows), rows  # the fields left out are really there
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def assert_resumed_run_is_exact(argv, tmp_path, launcher=()):
    """Run ``argv`` left alone; run it again, Ctrl-C in its second epoch, resume it: both end the same."""
    alone, stopped = tmp_path / "alone", tmp_path / "stopped"
    _train([*argv, "--output", str(alone)], launcher)
    code, err = interrupt_when_logged([*argv, "--output", str(stopped)], STOP_IN_SECOND_EPOCH, REPO, launcher)
    # wszoo exits 130; torchrun's agent, itself stopped by the signal, exits 1
    assert code == (1 if launcher else 130), err[-3000:]
    assert f"interrupted during epoch 1; {stopped} holds epochs 0..0" in err, err[-3000:]
    assert "\nepoch 0: train_loss " in err, err[-3000:]  # the finished epoch's log line names it once
    assert [row["epoch"] for row in _rows_without_timing(stopped)] == [0]
    _train([*argv, "--output", str(stopped), "--resume", str(stopped)], launcher)

    assert _rows_without_timing(stopped) == _rows_without_timing(alone)
    expected = _contents(alone)
    assert {"last/model.safetensors", "train_state.safetensors", "train_state.json"} <= set(expected)
    assert _contents(stopped) == expected


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_fashion_mnist(tmp_path_factory.mktemp("resume") / "fm", n_train=48, n_test=16)


def _finetune_args(images, workers, epochs=3, batch=4):
    return ["finetune", "--model", "resnet_mini_gn_ws", "--dataset", "fashion-mnist", "--data-dir", str(images),
            "--epochs", str(epochs), "-b", str(batch), "--accum-steps", "2", "--ema-decay", "0.9", "--clip-mode", "agc",
            "--aug", "timm", "--drop", "0.2", "--log-interval", "1", "--workers", str(workers)]


@pytest.mark.parametrize("workers", [0, 2])
def test_finetune_resumed_after_ctrl_c_ends_bitwise_equal(images, tmp_path, workers):
    assert_resumed_run_is_exact(_finetune_args(images, workers), tmp_path)


def test_finetune_under_torchrun_resumed_after_ctrl_c_ends_bitwise_equal(images, tmp_path):
    """Ctrl-C as a terminal sends it, to torchrun, both ranks and their DataLoader workers; 2 ranks x micro-batches
    of 2 images, 2 epochs (each of the 3 launches costs seconds of interpreter starts)."""
    assert_resumed_run_is_exact(_finetune_args(images, workers=2, epochs=2, batch=2), tmp_path, TORCHRUN)


def _detect_args(tmp_path, n_images, *extra):
    images, annotations = make_coco_shapes(tmp_path / "shapes", n_images=n_images)
    return ["detect", "train", "--train-images", str(images), "--train-annotations", str(annotations),
            "--backbone", "nf_regnet_b0", "--no-pretrained-backbone", "--min-size", "64", "--max-size", "64",
            "--rois-per-image", "32", "--warmup-iters", "2", "--epochs", "2", "-b", "1", "--accum-steps", "2",
            "--log-interval", "1", "--workers", "2", *extra]


@pytest.mark.parametrize("amp", [None, pytest.param("fp16", marks=pytest.mark.slow)])
def test_detect_train_resumed_after_ctrl_c_ends_bitwise_equal(tmp_path, amp):
    """4 images of shapes, flipped at random, micro-batches of 1; no val set (AP is a function of the weights,
    which are compared bit for bit, and costs seconds an epoch). Under fp16 the gradient scaler's state too
    (fp16 on the CPU: minutes)."""
    assert_resumed_run_is_exact(_detect_args(tmp_path, 4, *(["--amp", amp] if amp else [])), tmp_path)


@pytest.mark.slow
def test_detect_train_under_torchrun_resumed_after_ctrl_c_ends_bitwise_equal(tmp_path):
    """2 ranks x 4 images each (a minute of interpreter starts and detector steps)."""
    assert_resumed_run_is_exact(_detect_args(tmp_path, 8), tmp_path, TORCHRUN)


def test_segment_train_resumed_after_ctrl_c_ends_bitwise_equal(tmp_path):
    """4 images of 32 px rescaled, flipped and cropped at random (in 2 DataLoader workers), micro-batches of 1,
    mIoU on 2 val images after each epoch choosing best/."""
    voc = make_voc_segmentation(tmp_path / "voc", n_train=4, n_val=2, size=32, num_classes=3)
    assert_resumed_run_is_exact(["segment", "train", "--data-dir", str(voc), "--num-classes", "3",
                                 "--backbone", "nf_regnet_b0", "--no-pretrained-backbone", "--img-size", "32",
                                 "--epochs", "2", "-b", "1", "--accum-steps", "2", "--log-interval", "1",
                                 "--workers", "2"], tmp_path)
