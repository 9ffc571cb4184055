"""The micro-batch study (``wszoo study microbatch``): the WS paper's claim on real data.

The same small ResNet is trained on Fashion-MNIST with BatchNorm, GroupNorm, GroupNorm + WS and
Batch-Channel Norm + WS (estimated batch statistics) at batch sizes 1, 2 and 32, every run seeing
the same images in the same order for the same number of epochs (so batch 1 takes 32x the steps
of batch 32). The learning rate follows the linear
scaling rule from ``--lr`` at batch 32. Reported: test top-1 per (norm, batch) and the training
loss curves (PNG). BatchNorm's batch statistics are meaningless at batch 1-2; GN(+WS) has none.
"""
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms

from .. import registry
from ..factory import create_model
from .data import FASHION_MNIST_DIR, FashionMNIST
from .evaluate import evaluate

__all__ = ["NORMS", "microbatch_study", "format_table"]

#: study label -> registered architecture
NORMS = {"bn": "resnet_mini_bn", "gn": "resnet_mini_gn", "gn_ws": "resnet_mini_gn_ws", "bcn_ws": "resnet_mini_bcn_ws"}


def _run(arch: str, batch_size: int, train_set, test_set, epochs: int, lr32: float, widths: Sequence[int],
         seed: int, curve_points: int) -> Dict:
    torch.manual_seed(seed)
    model = create_model(arch, widths=tuple(widths))
    lr = lr32 * batch_size / 32
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    every = max(1, len(train_set) * epochs // curve_points)  # images between curve points
    curve: List[List[float]] = []
    seen, window_loss, window_n, start = 0, 0.0, 0, time.perf_counter()
    model.train()
    for _ in range(epochs):
        for images, targets in loader:
            loss = F.cross_entropy(model(images), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(targets)
            window_loss += loss.item() * len(targets)
            window_n += len(targets)
            if window_n >= every:
                curve.append([seen, window_loss / window_n])
                window_loss, window_n = 0.0, 0
    train_seconds = time.perf_counter() - start
    result = evaluate(model, test_set, batch_size=256, progress=False)
    return {"top1": result["top1"], "test_loss": result["loss"], "lr": lr, "steps": total,
            "train_seconds": round(train_seconds, 1), "curve": curve}


def microbatch_study(
    data_dir: str = FASHION_MNIST_DIR,
    batch_sizes: Sequence[int] = (1, 2, 32),
    norms: Sequence[str] = tuple(NORMS),
    train_images: Optional[int] = None,
    test_images: Optional[int] = None,
    epochs: int = 1,
    lr: float = 0.05,
    widths: Sequence[int] = (16, 32, 64),
    seed: int = 0,
    output: Optional[str] = None,
    log=print,
) -> Dict:
    """Train every (norm, batch size) pair; returns ``{"runs": {norm: {batch: result}}, "settings": ...}``."""
    unknown = [n for n in norms if n not in NORMS]
    if unknown:
        raise ValueError(f"unknown norms {unknown}; choose from {', '.join(NORMS)}")
    cfg = registry.get_pretrained_cfg("resnet_mini_gn_ws")
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(cfg["mean"], cfg["std"])])
    train_set = FashionMNIST(data_dir, "train", tf, limit=train_images)
    test_set = FashionMNIST(data_dir, "test", tf, limit=test_images)
    settings = {"train_images": len(train_set), "test_images": len(test_set), "epochs": epochs, "lr_at_32": lr,
                "widths": list(widths), "seed": seed, "batch_sizes": list(batch_sizes), "norms": list(norms)}
    runs: Dict[str, Dict[int, Dict]] = {}
    for norm in norms:
        for bs in batch_sizes:
            res = _run(NORMS[norm], bs, train_set, test_set, epochs, lr, widths, seed, curve_points=50)
            runs.setdefault(norm, {})[bs] = res
            log(f"{norm:6s} batch {bs:3d}: test top-1 {res['top1']:.2f}%  "
                f"({res['steps']} steps, {res['train_seconds']}s)")
    study = {"settings": settings, "runs": runs}
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "microbatch.json").write_text(json.dumps(study, indent=1))
        (out / "microbatch.md").write_text(format_table(study) + "\n")
        _plot(study, out / "microbatch_loss.png")
    return study


def format_table(study: Dict) -> str:
    """Markdown table: one row per norm, one column per batch size, test top-1 in percent."""
    sizes = study["settings"]["batch_sizes"]
    lines = ["| norm | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for norm, runs in study["runs"].items():
        lines.append(f"| {norm} | " + " | ".join(f"{runs[b]['top1']:.2f}" for b in sizes) + " |")
    return "\n".join(lines)


def _plot(study: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = study["settings"]["batch_sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 3.6), sharey=True)
    for ax, bs in zip(axes if len(sizes) > 1 else [axes], sizes, strict=True):
        for norm, runs in study["runs"].items():
            curve = runs[bs]["curve"]
            ax.plot([c[0] for c in curve], [c[1] for c in curve], label=f"{norm} ({runs[bs]['top1']:.1f}%)")
        ax.set_title(f"batch {bs}")
        ax.set_xlabel("training images seen")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes_list = axes if len(sizes) > 1 else [axes]
    axes_list[0].set_ylabel("training loss")
    fig.suptitle("Fashion-MNIST, small ResNet: training loss by normalizer (test top-1 in legend)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
