"""GPU checks of the WS variants and convert_to_ws (run on a CUDA machine:
``python scripts/gpu_check_variants.py OUT_DIR [--device cuda]``; ``--device cpu`` is a dry run).

CI has no GPU, so these run by hand: p4 equivariance and its CPU agreement, CWN norms,
Batch-Channel Norm against its CPU result, torchvision's ResNet-50 converted to GN+WS training,
folding and compiling (inductor) on the device. Writes OUT_DIR/gpu_variants.json; exits 1 on a failed check.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import wszoo
from wszoo.layers import BatchChannelNorm2d, CWNConv2d, P4OrientationPool, P4WSConv2d, rotate_p4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def p4_net() -> nn.Module:
    return nn.Sequential(P4WSConv2d(3, 16, 3, lifting=True), nn.GroupNorm(4, 16), nn.ReLU(),
                         P4WSConv2d(16, 16, 3, style="qiao"), nn.GroupNorm(4, 16), nn.ReLU(),
                         P4WSConv2d(16, 8, 3), P4OrientationPool(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    dev = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    checks, failures = {}, []

    def check(name: str, value, ok: bool) -> None:
        checks[name] = value
        if not ok:
            failures.append(name)

    torch.manual_seed(0)
    net = p4_net()
    x = torch.randn(4, 3, 33, 33)
    with torch.no_grad():
        cpu_out = net(x)
        net_dev = net.to(dev)
        out = net_dev(x.to(dev))
        check("p4_device_vs_cpu_rel", rel(out.cpu(), cpu_out), rel(out.cpu(), cpu_out) < 1e-4)
        inv = max(rel(net_dev(rotate_p4(x.to(dev), t)), out) for t in (1, 2, 3))
        check("p4_rotation_invariance_rel", inv, inv < 1e-4)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            bf16 = net_dev(x.to(dev))
        check("p4_bf16_rel", rel(bf16.float(), out), rel(bf16.float(), out) < 5e-2)
    compiled = torch.compile(p4_net().to(dev))
    loss = compiled(x.to(dev)).square().mean()
    loss.backward()
    check("p4_compile_train_loss_finite", float(loss), bool(torch.isfinite(loss)))

    cwn = CWNConv2d(64, 128, 3, learnable_scale=True).to(dev)
    norms = cwn.standardized_weight().reshape(128, -1).norm(dim=1)
    check("cwn_norm_max_dev", (norms - 1).abs().max().item(), (norms - 1).abs().max().item() < 1e-5)

    torch.manual_seed(1)
    bcn = BatchChannelNorm2d(64, 16, estimate=True)
    bcn_dev = BatchChannelNorm2d(64, 16, estimate=True).to(dev)
    bcn_dev.load_state_dict(bcn.state_dict())
    h = torch.randn(2, 64, 16, 16) * 2 + 1
    train_rel = rel(bcn_dev(h.to(dev)).cpu(), bcn(h))
    bcn.eval(), bcn_dev.eval()
    eval_rel = rel(bcn_dev(h[:1].to(dev)).cpu(), bcn(h[:1]))
    check("bcn_train_rel", train_rel, train_rel < 1e-5)
    check("bcn_eval_batch1_rel", eval_rel, eval_rel < 1e-5)

    torch.manual_seed(2)
    resnet = torchvision.models.resnet50(num_classes=10)
    report = wszoo.convert_to_ws(resnet, style="qiao", norm="gn")
    check("resnet50_converted", [len(report.converted), len(report.norms)],
          (len(report.converted), len(report.norms)) == (53, 53))
    resnet = resnet.to(dev)
    opt = torch.optim.SGD(resnet.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(8, 3, 128, 128, device=dev), torch.randint(0, 10, (8,), device=dev)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(resnet(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    check("resnet50_gn_ws_losses", losses, losses[-1] < losses[0])
    resnet.eval()
    with torch.no_grad():
        fold_rel = rel(wszoo.fold_ws(resnet)(images), resnet(images))
    check("resnet50_fold_rel", fold_rel, fold_rel < 1e-4)
    resnet.train()
    compiled = torch.compile(resnet)
    loss = F.cross_entropy(compiled(images), labels)
    loss.backward()
    check("resnet50_compile_train_loss", float(loss), bool(torch.isfinite(loss)))

    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "checks": checks, "failures": failures}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_variants.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
