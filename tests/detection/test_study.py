"""``wszoo study detection`` end to end on a tiny mosaic set (the full study runs for about 90 minutes: see
docs/detection.md), and the three detectors it compares: the same weights, only the normalization differs."""
import json

import pytest
import torch
import torch.nn as nn

from wszoo.cli import main
from wszoo.detection import build_detector
from wszoo.detection.study import REFERENCE_BATCH, format_table, with_normalization
from wszoo.layers import is_ws_layer


def _detector(norm: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_detector("fasterrcnn", "resnet18_gn_ws", 11, pretrained_backbone=False, min_size=64, max_size=64,
                           box_batch_size_per_image=8)
    return with_normalization(model, norm)


def test_the_three_detectors_differ_only_in_normalization():
    gn_ws, gn, bn = (_detector(norm) for norm in ("gn_ws", "gn", "bn"))
    assert sum(is_ws_layer(m) for m in gn_ws.modules()) > 30
    assert not any(is_ws_layer(m) for m in (*gn.modules(), *bn.modules()))
    group_norms = [name for name, m in gn_ws.named_modules() if isinstance(m, nn.GroupNorm)]
    assert group_norms == [name for name, m in gn.named_modules() if isinstance(m, nn.GroupNorm)]
    assert group_norms == [name for name, m in bn.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert not any(isinstance(m, nn.GroupNorm) for m in bn.modules())
    # BatchNorm where torchvision's _v2 detectors put it: backbone, FPN, box head
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in group_norms} >= {
        "backbone.body", "backbone.fpn", "roi_heads.box_head"}
    start = gn_ws.state_dict()  # the same starting weights (BatchNorm adds its running statistics)
    assert all(torch.equal(start[k], v) for k, v in gn.state_dict().items()) and gn.state_dict().keys() == start.keys()
    assert all(torch.equal(start[k], v) for k, v in bn.state_dict().items() if k in start)
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([3])}]
    for model in (gn_ws, gn, bn):  # one image a batch trains in every form
        assert torch.isfinite(sum(model.train()(images, targets).values()))
    with pytest.raises(ValueError, match="unknown norm"):
        with_normalization(gn_ws, "ln")


def test_study_runs_every_arm_on_the_same_images_and_reports(fmnist, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", "detection", "--data-dir", fmnist, "--train-images", "4", "--val-images", "2",
                 "--img-size", "64", "--epochs", "1", "--batch-sizes", "1", "4", "--norms", "bn", "gn_ws",
                 "--rois-per-image", "8", "--warmup-images", "4", "--lr", "0.02", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| norm | box AP / AP50, batch 1 | box AP / AP50, batch 4 |" in printed
    assert "| bn |" in printed and "| gn_ws |" in printed
    study = json.loads((out / "detection.json").read_text())
    assert study["settings"]["train_images"] == 4 and study["settings"]["kind"] == "fasterrcnn"
    runs = [(norm, int(bs), run) for norm, by_size in study["runs"].items() for bs, run in by_size.items()]
    assert sorted((n, b) for n, b, _ in runs) == [("bn", 1), ("bn", 4), ("gn_ws", 1), ("gn_ws", 4)]
    for norm, bs, run in runs:
        assert run["diverged"] is None, (norm, bs, run["diverged"])
        assert 0 <= run["bbox_AP"] <= run["bbox_AP50"] <= 100  # COCO AP in percent, by pycocotools
        assert run["steps"] == 4 // bs and run["images_seen"] == 4 and run["train_loss"] > 0
        assert run["lr"] == pytest.approx(0.02 * bs / REFERENCE_BATCH)
        assert len(run["curve"]) >= 1 and run["curve"][-1][0] == 4
    assert len({run["images_digest"] for _, _, run in runs}) == 1  # the same images, flips and order in every arm
    by_int = {norm: {int(b): r for b, r in by_size.items()} for norm, by_size in study["runs"].items()}
    assert (out / "detection.md").read_text().strip() == format_table({"settings": study["settings"], "runs": by_int})
    assert (out / "detection_loss.png").stat().st_size > 10_000
    assert (out / "mosaic" / "annotations" / "instances_val.json").is_file()


def test_study_refuses_an_unknown_norm(tmp_path, capsys):
    assert main(["study", "detection", "--norms", "bn", "ln", "--output", str(tmp_path / "out")]) == 2
    assert "unknown norms ['ln']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
