"""``wszoo segment train`` / ``wszoo segment eval`` end to end, as a user runs them: a VOC-layout set the test
writes, the CLI in a child process, mIoU above what the best constant prediction scores on the same masks,
bad masks refused before training, the same figures under torchrun. (Exact resume after Ctrl-C:
tests/test_resume_exact.py.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.data_fixtures import make_voc_segmentation, write_palette_mask
from tests.helpers import child_log, run_cli, tree_snapshot

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES = 3
# nf_regnet_b0 from random weights learns these colours within a few SGD steps (resnet18_gn_ws needs dozens);
# 32-px crops at output stride 8: 4x4 features
SMALL = ["--backbone", "nf_regnet_b0", "--no-pretrained-backbone", "--num-classes", str(NUM_CLASSES),
         "--img-size", "32", "--output-stride", "8", "--log-interval", "0"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc_segmentation(tmp_path_factory.mktemp("voc") / "voc", n_train=12, n_val=6, size=32,
                                 num_classes=NUM_CLASSES)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(voc, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "run"
    code, stdout, err = run_cli(["segment", "train", "--data-dir", str(voc), "--epochs", "2", "-b", "2",
                                 "--output", str(out), *SMALL])
    assert code == 0, err[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["epoch"] == 1  # the last epoch's metrics, on stdout
    return out


def _best_constant_miou(voc, split="val"):
    """The mIoU of predicting one class everywhere, the best such class, counted from the masks themselves."""
    ids = (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    labels = np.concatenate([np.asarray(Image.open(voc / "SegmentationClass" / f"{i}.png")).reshape(-1) for i in ids])
    counts = np.bincount(labels[labels != 255], minlength=NUM_CLASSES)
    present = np.count_nonzero(counts)
    return max(100 * counts[k] / counts.sum() / present for k in range(NUM_CLASSES))


def test_training_writes_the_run_and_learns_more_than_a_constant(trained, voc):
    rows = _rows(trained)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(len(r["val_IoU"]) == NUM_CLASSES and r["val_seconds"] > 0 for r in rows)
    for folder in ("best", "last"):
        assert {p.name for p in (trained / folder).iterdir()} == {"model.safetensors", "segmenter.json"}
    config = json.loads((trained / "best" / "segmenter.json").read_text())
    best = max(rows, key=lambda r: r["val_mIoU"])
    assert (config["backbone"], config["num_classes"], config["img_size"]) == ("nf_regnet_b0", NUM_CLASSES, 32)
    assert config["training"]["epochs"] == best["epoch"] + 1
    assert config["training"]["val_mIoU"] == best["val_mIoU"]
    assert config["training"]["val_dataset"] == "VOC-layout 'voc' val (6 images)"
    floor = _best_constant_miou(voc)
    assert best["val_mIoU"] > floor + 10, (rows, floor)


def test_eval_gives_the_figures_the_training_measured(trained, voc, tmp_path):
    results = tmp_path / "r.json"
    code, out, err = run_cli(["segment", "eval", "--checkpoint", str(trained / "best"), "--data-dir", str(voc),
                              "--split", "val", "--results-file", str(results)])
    assert code == 0, err[-3000:]
    written = json.loads(results.read_text())
    best = max(_rows(trained), key=lambda r: r["val_mIoU"])
    assert written["mIoU"] == pytest.approx(best["val_mIoU"])
    assert written["pixel_acc"] == pytest.approx(best["val_pixel_acc"])
    assert [None if v is None else round(v, 2) for v in written["IoU"]] == best["val_IoU"]
    assert written["dataset"] == "VOC-layout 'voc' val (6 images)"
    assert f"mIoU {written['mIoU']:.2f}  pixel_acc {written['pixel_acc']:.2f}" in out
    assert len([line for line in out.splitlines() if " IoU " in line]) == NUM_CLASSES


def _write_mask(voc, image_id, mask):
    write_palette_mask(voc / "SegmentationClass" / f"{image_id}.png", mask)


@pytest.fixture
def broken_voc(voc, tmp_path):
    """A copy of the set to break."""
    import shutil

    return Path(shutil.copytree(voc, tmp_path / "voc"))


def _train_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(["segment", "train", "--data-dir", str(data_dir), "--epochs", "1", "--output", str(out),
                            *SMALL])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not out.exists()
    return err


def test_a_label_out_of_range_is_refused_naming_the_file(broken_voc, tmp_path):
    mask = np.asarray(Image.open(broken_voc / "SegmentationClass" / "val_0003.png")).copy()
    mask[0, 0] = NUM_CLASSES  # one pixel of a class that does not exist
    _write_mask(broken_voc, "val_0003", mask)
    err = _train_refused(broken_voc, tmp_path)
    assert f"val_0003.png has label(s) {NUM_CLASSES}" in err and f"[0, {NUM_CLASSES})" in err


def test_a_mask_of_another_size_is_refused_naming_the_file(broken_voc, tmp_path):
    _write_mask(broken_voc, "train_0002", np.zeros((32, 30)))
    err = _train_refused(broken_voc, tmp_path)
    assert "train_0002.png is 30x32 but its image" in err and "train_0002.jpg is 32x32" in err


def test_missing_files_are_refused_naming_them(broken_voc, tmp_path):
    (broken_voc / "JPEGImages" / "train_0005.jpg").unlink()
    err = _train_refused(broken_voc, tmp_path)
    assert "1 of the 12 ids" in err and "train_0005.jpg" in err
    (broken_voc / "ImageSets" / "Segmentation" / "train.txt").unlink()
    err = _train_refused(broken_voc, tmp_path)
    assert "ImageSets/Segmentation/train.txt does not exist" in err


def test_a_colour_mask_is_refused(broken_voc, tmp_path):
    Image.new("RGB", (32, 32)).save(broken_voc / "SegmentationClass" / "train_0000.png")
    assert "train_0000.png is a RGB image" in _train_refused(broken_voc, tmp_path)


def test_resume_and_eval_mistakes_are_one_line(trained, voc, tmp_path):
    before = tree_snapshot(trained)
    code, _, err = run_cli(["segment", "train", "--data-dir", str(voc), "--epochs", "3", "--resume", str(trained),
                            *[a if a != "nf_regnet_b0" else "resnet18_gn_ws" for a in SMALL]])
    assert code == 2 and "backbone 'nf_regnet_b0'" in err and "--backbone nf_regnet_b0" in err, err
    code, _, err = run_cli(["segment", "eval", "--checkpoint", str(tmp_path), "--data-dir", str(voc)])
    assert code == 2 and "segmenter.json" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["segment", "eval", "--checkpoint", str(trained / "best"), "--data-dir", str(voc),
                            "--results-file", str(tmp_path / "no" / "r.json")])
    assert code == 2 and "--results-file" in err
    assert tree_snapshot(trained) == before


def test_eval_under_torchrun_sums_the_shards_to_one_process_figures(trained, voc, tmp_path):
    """2 processes each score 3 of the 6 val images; the summed confusion matrix is one process's."""
    one = tmp_path / "one.json"
    code, _, err = run_cli(["segment", "eval", "--checkpoint", str(trained / "best"), "--data-dir", str(voc),
                            "--results-file", str(one)])
    assert code == 0, err
    two = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "wszoo",
           "segment", "eval", "--checkpoint", str(trained / "best"), "--data-dir", str(voc),
           "--results-file", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, child_log(proc)
    assert proc.stdout.count("mIoU ") == 1  # rank 0 prints, once
    single, sharded = json.loads(one.read_text()), json.loads(two.read_text())
    assert single["pixels"] == sharded["pixels"] > 0
    assert {k: sharded[k] for k in ("mIoU", "pixel_acc", "IoU")} == {k: single[k] for k in ("mIoU", "pixel_acc", "IoU")}
