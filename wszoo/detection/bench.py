"""A detector's training step, timed: the GN+WS detector against its folded copy (plain convs: what WS itself
costs) and torchvision's ResNet-50 FPN detector of the kind (``wszoo bench --detector``)."""
import copy
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .. import registry
from ..speed import fold_ws, group_ws
from ..tools.bench import prepare_run
from ..tools.timing import ratio, saved_bytes, time_interleaved, timing_entry
from .detectors import build_detector

__all__ = ["detection_batch", "benchmark_detector", "run_detector_benchmark"]


def detection_batch(batch: int, size: int, masks: bool, dev: torch.device) -> Tuple[list, list]:
    """``batch`` images with three boxes (and masks) each: a fixed training input for the detector step."""
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=gen).to(dev) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.4, 0.3, 0.9, 0.8], [0.2, 0.6, 0.6, 0.95]]) * size
        target = {"boxes": boxes.to(dev), "labels": torch.tensor([1, 2, 3], device=dev)}
        if masks:
            grid = torch.zeros(3, size, size, dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                grid[k, y0:y1, x0:x1] = 1
            target["masks"] = grid.to(dev)
        targets.append(target)
    return images, targets


def benchmark_detector(kind: str = "maskrcnn", backbone: str = "resnet50_gn_ws", img_size: int = 320,
                       batch: int = 2, rois: Sequence[int] = (512, 32), repeats: int = 3, warmup: int = 1,
                       device: str = "cpu") -> Dict[str, Any]:
    """A detector's training step (SGD, batch ``batch`` at ``img_size``): the GN+WS detector (as built: the
    device's default standardization; and with grouping forced on) against the same detector folded (plain
    convs: what WS itself costs) and torchvision's ResNet-50 FPN detector of the kind,
    at each box-head sample count in ``rois`` (the 4conv1fc GN+WS box head's cost grows with it)."""
    from torchvision.models import detection as tv

    dev = torch.device(device)
    images, targets = detection_batch(batch, img_size, kind == "maskrcnn", dev)
    result: Dict[str, Any] = {"detector": kind, "backbone": backbone, "img_size": img_size, "batch": batch}
    ratios: Dict[str, float] = {}
    for n in rois:
        size = dict(min_size=img_size, max_size=img_size)
        per_rois = {} if kind == "retinanet" else {"box_batch_size_per_image": n}
        torch.manual_seed(0)
        ws = build_detector(kind, backbone, 91, pretrained_backbone=False, **size, **per_rois).to(dev)
        folded = fold_ws(ws)
        reference = getattr(tv, f"{kind}_resnet50_fpn")(weights=None, weights_backbone=None, num_classes=91, **size,
                                                          **per_rois).to(dev)
        grouped = group_ws(copy.deepcopy(ws), enabled=True)
        fns = {}
        for name, model in (("ws", ws), ("ws_grouped", grouped), ("folded", folded), ("torchvision", reference)):
            model.train()
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

            def step(model=model, opt=opt) -> None:
                opt.zero_grad(set_to_none=True)
                sum(model(images, targets).values()).backward()
                opt.step()
            fns[name] = step
        med: Dict[str, float] = {}
        t = time_interleaved(fns, repeats, warmup, dev, med)
        entry = timing_entry(t, med)
        entry["ws_vs_torchvision"] = ratios[f"{kind}_rois{n}_ws_vs_torchvision"] = ratio(t["ws"], t["torchvision"])
        entry["ws_vs_folded"] = ratios[f"{kind}_rois{n}_ws_vs_folded"] = ratio(t["ws"], t["folded"])
        entry["ws_grouped_vs_folded"] = ratios[f"{kind}_rois{n}_ws_grouped_vs_folded"] = \
            ratio(t["ws_grouped"], t["folded"])
        entry["saved_for_backward_mb"] = {k: round(saved_bytes(fns[k], m) / 2**20, 1)
                                         for k, m in (("ws", ws), ("torchvision", None))}
        result[f"rois{n}"] = entry
        if kind == "retinanet":
            break
    result["ratios"] = ratios
    result["model"] = f"{kind} ({backbone})"
    return result


def run_detector_benchmark(kind: str = "maskrcnn", backbone: str = "resnet50_gn_ws", tune_allocator: bool = True,
                           threads: Optional[int] = None, img_size: Optional[int] = None, train_batch: int = 2,
                           repeats: int = 3, warmup: int = 1, device: str = "cpu") -> Dict[str, Any]:
    """:func:`benchmark_detector` in a report describing the machine (as :func:`wszoo.tools.bench.run_benchmarks`)."""
    registry.get_pretrained_cfg(backbone)  # fail fast on an unknown name, before any timing
    report = prepare_run(device, tune_allocator, threads)
    report["results"].append(benchmark_detector(kind, backbone, img_size=img_size or 320, batch=train_batch,
                                                repeats=repeats, warmup=warmup, device=device))
    return report
