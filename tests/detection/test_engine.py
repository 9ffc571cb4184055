"""``wszoo detect train`` / ``wszoo detect eval`` end to end, as a detection user runs them: a COCO-format
set of shapes the test writes, COCO AP from pycocotools (not ours), resume, masks, torchrun. (The Ctrl-C test
runs in make test-slow: tests/test_resume_exact.py interrupts and resumes detect train in make test.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.data_fixtures import make_coco_shapes
from tests.helpers import child_log, interrupt_second_epoch, run_cli, tree_snapshot
from wszoo.cli import main
from wszoo.detection import build_detector, load_detector

REPO = Path(__file__).resolve().parents[2]
BACKBONE = "nf_regnet_b0"
# 64-px images at their own size, 32 sampled RoIs: ~5 s an epoch of 32 images on 2 CPU cores
SMALL = ["--backbone", BACKBONE, "--no-pretrained-backbone", "--min-size", "64", "--max-size", "64",
         "--rois-per-image", "32", "--log-interval", "0", "--warmup-iters", "5"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """32 training images and 16 validation images (another seed) of squares and plus signs."""
    root = tmp_path_factory.mktemp("coco")
    return make_coco_shapes(root / "train", n_images=32, seed=0), make_coco_shapes(root / "val", n_images=16, seed=1)


@pytest.fixture(scope="module")
def few_shapes(tmp_path_factory):
    """8 training and 4 validation images: enough for a run to produce every metric, not to learn."""
    root = tmp_path_factory.mktemp("coco_few")
    return make_coco_shapes(root / "train", n_images=8, seed=0), make_coco_shapes(root / "val", n_images=4, seed=1)


def _train_args(shapes, out, *extra):
    (train_images, train_ann), (val_images, val_ann) = shapes
    return ["detect", "train", "--train-images", str(train_images), "--train-annotations", str(train_ann),
            "--val-images", str(val_images), "--val-annotations", str(val_ann), "--output", str(out), *SMALL,
            *extra]


def _epochs(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """A Faster R-CNN trained 2 epochs, then resumed for a third: the run a user makes."""
    out = tmp_path_factory.mktemp("det") / "run"
    assert main(_train_args(shapes, out, "--epochs", "2", "-b", "4", "--lr", "0.02")) == 0
    assert main(_train_args(shapes, out, "--epochs", "3", "-b", "4", "--lr", "0.02", "--resume", str(out))) == 0
    return out


def test_training_learns_the_shapes_and_resume_continues(trained):
    rows = _epochs(trained)
    assert [r["epoch"] for r in rows] == [0, 1, 2]  # resume appended epoch 2, repeated nothing
    assert all(r["train_seconds"] > 0 and r["val_seconds"] > 0 for r in rows)
    # pycocotools' AP50 on held-out images: chance is ~0; 3 short epochs find most shapes
    assert rows[-1]["bbox_AP50"] > 30, rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    config = json.loads((trained / "best" / "detector.json").read_text())
    assert config["kind"] == "fasterrcnn" and config["backbone"] == BACKBONE
    assert config["categories"] == {"1": "square", "7": "plus"}
    assert not list(trained.rglob("*.pending*"))


def test_eval_prints_the_ap_the_training_measured(trained, shapes, capsys):
    _, (val_images, val_ann) = shapes
    best_epoch = max(_epochs(trained), key=lambda r: r["bbox_AP"])
    assert main(["detect", "eval", "--checkpoint", str(trained / "best"), "--images", str(val_images),
                 "--annotations", str(val_ann)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("bbox: AP ")
    figures = dict(zip(line.split()[1::2], line.split()[2::2], strict=True))
    assert float(figures["AP"]) == pytest.approx(best_epoch["bbox_AP"], abs=0.01)
    assert float(figures["AP50"]) == pytest.approx(best_epoch["bbox_AP50"], abs=0.01)


def test_resume_and_rerun_mistakes_are_refused_and_change_nothing(trained, shapes):
    before = tree_snapshot(trained)
    code, _, err = run_cli(_train_args(shapes, trained, "--epochs", "3"))  # a rerun into the same folder
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(_train_args(shapes, trained, "--epochs", "4", "--lr", "0.05", "--resume", str(trained)))
    assert code == 2 and "same --lr" in err
    code, _, err = run_cli(_train_args(shapes, trained, "--epochs", "3", "--lr", "0.02", "--resume", str(trained)))
    assert code == 2 and "pass --epochs above 3" in err
    retinanet = _train_args(shapes, trained, "--epochs", "4", "--lr", "0.02", "--kind", "retinanet", "--resume",
                            str(trained))
    code, _, err = run_cli(retinanet)  # (SMALL sets --rois-per-image: an R-CNN setting)
    assert code == 2 and "--rois-per-image and --test-proposals set the R-CNN heads" in err, err
    del retinanet[retinanet.index("--rois-per-image"):retinanet.index("--rois-per-image") + 2]
    code, _, err = run_cli(retinanet)
    assert code == 2 and "kind 'fasterrcnn'" in err
    assert tree_snapshot(trained) == before


def test_bad_data_is_a_one_line_error(shapes, tmp_path):
    (images, ann), _ = shapes
    out = tmp_path / "run"
    args = ["detect", "train", "--train-images", str(images), "--output", str(out), *SMALL]
    code, _, err = run_cli([*args, "--train-annotations", str(tmp_path / "missing.json")])
    assert code == 2 and "missing.json does not exist" in err and len(err.strip().splitlines()) == 1
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"images": [{"id": 1, "file_name": "0000.png"}], "annotations": []}))
    code, _, err = run_cli([*args, "--train-annotations", str(broken)])
    assert code == 2 and "broken.json" in err and len(err.strip().splitlines()) == 1
    broken.write_text(json.dumps({"images": [{"id": 1, "file_name": "0000.png"}], "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]}], "categories": [{"id": 1, "name": "a"}]}))
    code, _, err = run_cli([*args, "--train-annotations", str(broken)])
    assert code == 2 and "category_id 3" in err
    code, _, err = run_cli([*args, "--train-annotations", str(ann), "--train-images", str(tmp_path)])
    assert code == 2 and "32 of the 32 images" in err
    code, _, err = run_cli(["detect", "eval", "--checkpoint", str(tmp_path), "--images", str(images),
                            "--annotations", str(ann)])
    assert code == 2 and "detector.json" in err
    assert not out.exists()


def test_mask_rcnn_reports_mask_ap(few_shapes, tmp_path):
    out = tmp_path / "mask"
    assert main(_train_args(few_shapes, out, "--kind", "maskrcnn", "--epochs", "1", "-b", "4")) == 0
    row = _epochs(out)[0]
    assert {"bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"} <= set(row)
    assert all(v is None or 0 <= v <= 100 for k, v in row.items() if k.startswith(("bbox_", "segm_")))
    assert any(k.startswith("roi_heads.mask_predictor") for k in load_file(str(out / "last" / "model.safetensors")))


def test_test_proposals_are_saved_with_the_detector(few_shapes, tmp_path):
    """--test-proposals reaches torchvision's RPN in evaluation (not in training) and the saved folder rebuilds
    the detector with it: detect eval scores what the run validated. (Trained with --clip-mode agc: on the CPU
    the clip inside the SGD step, wszoo.optim.SGDWithAGC.)"""
    out = tmp_path / "proposals"
    assert main(_train_args(few_shapes, out, "--epochs", "1", "-b", "4", "--test-proposals", "20",
                            "--clip-mode", "agc", "--clip-grad", "0.05")) == 0
    assert _epochs(out)[0]["train_loss"] > 0
    saved = json.loads((out / "last" / "detector.json").read_text())["detector_kwargs"]
    assert saved["rpn_pre_nms_top_n_test"] == saved["rpn_post_nms_top_n_test"] == 20
    model, _ = load_detector(str(out / "last"))
    model.eval()
    assert (model.rpn.pre_nms_top_n(), model.rpn.post_nms_top_n()) == (20, 20)
    model.train()
    assert model.rpn.post_nms_top_n() == 2000  # torchvision's training default, untouched


def test_micro_batches_under_torchrun(shapes, tmp_path):
    """2 processes x micro-batches of 1 image x 2 steps: the recipe docs/detection.md gives for small GPUs."""
    out = tmp_path / "ddp"
    (images, ann), _ = shapes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "wszoo",
           "detect", "train", "--train-images", str(images), "--train-annotations", str(ann), "--epochs", "1",
           "-b", "1", "--accum-steps", "2", "--output", str(out), *SMALL]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, child_log(proc)
    metrics_lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(metrics_lines) == 1, proc.stdout  # rank 0 prints the final metrics, once
    assert json.loads(metrics_lines[0])["train_loss"] > 0
    rows = _epochs(out)
    assert [r["epoch"] for r in rows] == [0] and rows[0]["train_loss"] > 0
    # rank 0's random start (seed 0), broadcast by DDP, moved by the steps; every value finite
    torch.manual_seed(0)
    start = build_detector("fasterrcnn", BACKBONE, 3, pretrained_backbone=False, min_size=64, max_size=64,
                           box_batch_size_per_image=32).state_dict()
    weights = load_file(str(out / "last" / "model.safetensors"))
    assert weights.keys() == start.keys()
    assert all(v.isfinite().all() for v in weights.values())
    assert (weights["roi_heads.box_predictor.cls_score.weight"] - start["roi_heads.box_predictor.cls_score.weight"]
            ).abs().max() > 1e-4


@pytest.mark.slow  # make test: tests/test_resume_exact.py interrupts detect train (and checks the line) already
def test_ctrl_c_says_which_epochs_are_saved_and_how_to_resume(shapes, tmp_path):
    """A real ``python -m wszoo detect train`` stopped with SIGINT in its second epoch, then resumed."""
    out = tmp_path / "run"
    (images, ann), _ = shapes
    # batches of 1 image: 32 steps an epoch, so that the second one lasts long enough to be interrupted in
    args = ["detect", "train", "--train-images", str(images), "--train-annotations", str(ann), "--output", str(out),
            *SMALL, "-b", "1"]
    returncode, err = interrupt_second_epoch([*args, "--epochs", "3"], out, REPO)
    assert returncode == 130, err
    assert "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("wszoo")] == [
        f"wszoo detect train: interrupted during epoch 1; {out} holds epochs 0..0: resume with the same command "
        f"and --resume {out}"]
    assert [r["epoch"] for r in _epochs(out)] == [0]
    assert not any(p.name.startswith(".") for p in out.iterdir()), "no half-written epoch may be left"
    assert main([*args, "--epochs", "2", "--resume", str(out)]) == 0
    assert [r["epoch"] for r in _epochs(out)] == [0, 1]
