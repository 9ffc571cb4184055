"""GPU: the eager training step with WS layers standardized together (``wszoo.group_ws``, the default) vs
layer by layer vs plain convs, and the standardization alone; then a GN+WS Mask R-CNN step the same three
ways. The targets it checks (issue 18): eager step at batch 32 <= 1.10x plain for resnet50_gn_ws,
resnetv2_50x1_bit and nf_resnet50; all standardization of ResNet-50 fwd+bwd <= 1.5 ms; the Mask R-CNN
(``build_detector('maskrcnn', 'resnet50_gn_ws')``, batch 2 at 800x1333) step <= 1.05x its plain-conv copy.
Also (issue 27) adaptive gradient clipping on nfnet_f0 and nf_resnet50: one SGD step with AGC against the same
step without, for AGC all at once (the default on GPUs: weights concatenated per unit shape), per weight (the
CPU's layout), and timm's per-parameter loop.

    python scripts/gpu_grouped_bench.py OUT_DIR                      # on a CUDA machine: the targets' sizes
    python scripts/gpu_grouped_bench.py OUT_DIR --device cpu --batch 2 --img-size 32 --det-size 64 96 \
        --det-backbone nf_regnet_b0 --repeats 1 --models resnet_mini_gn_ws --agc-models nf_regnet_b0  # CPU dry run

Writes OUT_DIR/gpu_grouped_bench.json (after each model, so a cut-short run keeps what it measured).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

import wszoo
from wszoo.layers.grouped import standardize_layers
from wszoo.speed import ws_layers
from wszoo.tools.bench import count_dispatches, time_interleaved, train_step_fn


def _sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)


def classifier(name: str, dev: torch.device, batch: int, img_size: int | None, repeats: int) -> dict:
    torch.manual_seed(0)
    grouped = wszoo.group_ws(wszoo.create_model(name), True).to(dev).train()
    per_layer = wszoo.group_ws(copy.deepcopy(grouped), enabled=False)
    plain = wszoo.fold_ws(grouped).train()
    size = img_size or grouped.pretrained_cfg["input_size"][-1]
    images = torch.randn(batch, grouped.in_chans, size, size, device=dev)
    targets = torch.randint(0, grouped.num_classes, (batch,), device=dev)
    fns = {k: train_step_fn(m, _sgd(m), images, targets)
           for k, m in (("grouped", grouped), ("per_layer", per_layer), ("plain", plain))}
    best = time_interleaved(fns, repeats=repeats, warmup=min(2, repeats), device=dev)
    layers = [layer for _, layer in ws_layers(grouped)]

    def standardize(weights):
        torch.autograd.backward(weights, [torch.ones_like(w) for w in weights])
        grouped.zero_grad(set_to_none=True)

    std = time_interleaved({"grouped": lambda: standardize(standardize_layers(layers)),
                            "per_layer": lambda: standardize([layer.standardized_weight() for layer in layers])},
                           repeats=repeats, warmup=min(2, repeats), device=dev)
    plain_ops = count_dispatches(fns["plain"])
    return {"img_size": size, "batch": batch, "step_ms": {k: round(v * 1e3, 2) for k, v in best.items()},
            "grouped_vs_plain": round(best["grouped"] / best["plain"], 3),
            "per_layer_vs_plain": round(best["per_layer"] / best["plain"], 3),
            "standardize_fwd_bwd_ms": {k: round(v * 1e3, 3) for k, v in std.items()},
            "extra_dispatches": {"grouped": count_dispatches(fns["grouped"]) - plain_ops,
                                 "per_layer": count_dispatches(fns["per_layer"]) - plain_ops}}


def agc(name: str, dev: torch.device, repeats: int) -> dict:
    """An SGD step (Nesterov, weight decay) with AGC on every parameter but the classifier against the step
    without: ours concatenated (the GPU default), ours per weight, timm's per-parameter loop, and the clip inside
    a per-parameter SGD step (SGDWithAGC, the CPU's choice)."""
    from timm.utils.agc import adaptive_clip_grad as timm_agc

    from wszoo.optim import SGDWithAGC, adaptive_clip_grad, agc_parameters

    torch.manual_seed(0)
    model = wszoo.create_model(name).to(dev)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 0.05
    params = agc_parameters(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9, nesterov=True, weight_decay=1e-5)
    fns = {"sgd": opt.step,
           "agc_concatenated": lambda: (adaptive_clip_grad(params, 0.01, concatenate=True), opt.step()),
           "agc_per_weight": lambda: (adaptive_clip_grad(params, 0.01, concatenate=False), opt.step()),
           "timm_agc": lambda: (timm_agc(params, 0.01), opt.step()),
           # the clip inside a per-parameter SGD step (the CPU's choice), for comparison on this device
           "sgd_with_agc": SGDWithAGC(model.parameters(), params, lr=1e-6, momentum=0.9, nesterov=True,
                                      weight_decay=1e-5, clip_factor=0.01).step}
    best = time_interleaved(fns, repeats=repeats, warmup=min(2, repeats), device=dev)
    dispatches = {"agc_concatenated": count_dispatches(lambda: adaptive_clip_grad(params, 0.01, concatenate=True)),
                  "agc_per_weight": count_dispatches(lambda: adaptive_clip_grad(params, 0.01, concatenate=False)),
                  "timm_agc": count_dispatches(lambda: timm_agc(params, 0.01))}
    return {"parameters": len(params), "step_ms": {k: round(v * 1e3, 3) for k, v in best.items()},
            **{f"{k}_vs_sgd": round(best[k] / best["sgd"], 3) for k in fns if k != "sgd"}, "dispatches": dispatches}


def detector(dev: torch.device, backbone: str, height: int, width: int, repeats: int) -> dict:
    from wszoo.detection import build_detector

    torch.manual_seed(0)
    size = dict(min_size=height, max_size=width)
    grouped = build_detector("maskrcnn", backbone, 91, pretrained_backbone=False, group_ws=True,
                             **size).to(dev).train()
    per_layer = wszoo.group_ws(copy.deepcopy(grouped), enabled=False)
    plain = wszoo.fold_ws(grouped).train()
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, height, width, generator=gen).to(dev) for _ in range(2)]
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.4, 0.3, 0.9, 0.8]]) * torch.tensor([width, height] * 2)
    masks = torch.zeros(2, height, width, dtype=torch.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        masks[k, y0:y1, x0:x1] = 1
    targets = [{"boxes": boxes.to(dev), "labels": torch.tensor([1, 2], device=dev), "masks": masks.to(dev)}
               for _ in range(2)]

    def step_fn(model):
        opt = _sgd(model)

        def step():
            opt.zero_grad(set_to_none=True)
            sum(model(images, targets).values()).backward()
            opt.step()
        return step

    best = time_interleaved({k: step_fn(m) for k, m in (("grouped", grouped), ("per_layer", per_layer),
                                                       ("plain", plain))},
                            repeats=repeats, warmup=min(2, repeats), device=dev)
    return {"backbone": backbone, "image": [height, width], "batch": 2,
            "step_ms": {k: round(v * 1e3, 2) for k, v in best.items()},
            "grouped_vs_plain": round(best["grouped"] / best["plain"], 3),
            "per_layer_vs_plain": round(best["per_layer"] / best["plain"], 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=None, help="default: each model's cfg size")
    parser.add_argument("--det-size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--det-backbone", default="resnet50_gn_ws")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", nargs="*", default=["resnet50_gn_ws", "resnetv2_50x1_bit", "nf_resnet50"])
    parser.add_argument("--agc-models", nargs="*", default=["nfnet_f0", "nf_resnet50"])
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
               "models": {}}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        results["models"][name] = entry = classifier(name, dev, args.batch, args.img_size, args.repeats)
        print(name, json.dumps(entry), flush=True)
        (out / "gpu_grouped_bench.json").write_text(json.dumps(results, indent=1))
    results["agc"] = {}
    for name in args.agc_models:
        results["agc"][name] = entry = agc(name, dev, args.repeats)
        print("agc", name, json.dumps(entry), flush=True)
        (out / "gpu_grouped_bench.json").write_text(json.dumps(results, indent=1))
    results["maskrcnn"] = entry = detector(dev, args.det_backbone, *args.det_size, max(1, args.repeats // 2))
    print("maskrcnn", json.dumps(entry), flush=True)
    (out / "gpu_grouped_bench.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
