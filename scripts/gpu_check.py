"""GPU checks of the speed features (run on a CUDA machine: ``python scripts/gpu_check.py OUT_DIR``).

CI has no GPU, so these run by hand: cached eval, fold_ws, accumulate_ws and channels-last on CUDA
under bf16 autocast, torch.compile (inductor) of every family, ONNX export of a folded model, and
``wszoo bench --device cuda`` (its JSON goes to OUT_DIR/bench_cuda.json).
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import wszoo
from wszoo.tools.bench import format_report, run_benchmarks, write_report

FAMILIES = ["resnet50_gn_ws", "resnetv2_50x1_bit", "nf_resnet50", "dm_nfnet_f0"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main(out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    # exactness checks: no TF32 (its 10-bit mantissa alone moves a random 50-layer net's outputs ~1e-2)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": {}}
    failures = []
    for name in FAMILIES:
        torch.manual_seed(0)
        model = wszoo.create_model(name, num_classes=10).to(dev)
        x = torch.randn(4, 3, 128, 128, device=dev)
        y = torch.randint(0, 10, (4,), device=dev)
        checks = {}
        # eval: cache, fold, bf16 autocast
        model.eval()
        with torch.no_grad():
            ref = model(x)
            cached = model(x)
            folded = wszoo.fold_ws(model)
            checks["fold_rel"] = rel(folded(x), ref)
            checks["cache_equal"] = bool(torch.equal(cached, ref))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                checks["bf16_rel"] = rel(model(x), ref)
        # accumulate_ws vs per-micro-batch gradients
        model.train()
        twin = copy.deepcopy(model)
        for i in range(4):
            (F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]) / 4).backward()
        with wszoo.accumulate_ws(twin):
            for i in range(4):
                (F.cross_entropy(twin(x[i:i + 1]), y[i:i + 1]) / 4).backward()
        checks["accumulate_grad_rel"] = max(rel(q.grad, p.grad)
                                            for p, q in zip(model.parameters(), twin.parameters(), strict=True)
                                            if p.grad is not None)
        # channels-last training step
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        checks["channels_last_rel"] = rel(cl(x.contiguous(memory_format=torch.channels_last)), model(x))
        # torch.compile (inductor): a training step and eval
        start = time.perf_counter()
        compiled = torch.compile(copy.deepcopy(model))
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        checks["compile_train_loss_rel"] = abs(loss.item() - F.cross_entropy(model(x), y).item()) / loss.item()
        checks["compile_seconds"] = round(time.perf_counter() - start, 1)
        report["checks"][name] = checks
        print(name, json.dumps(checks), flush=True)
        if not (checks["fold_rel"] < 1e-3 and checks["cache_equal"] and checks["accumulate_grad_rel"] < 1e-3
                and checks["channels_last_rel"] < 1e-3 and checks["compile_train_loss_rel"] < 1e-3
                and checks["bf16_rel"] < 0.5):  # bf16 through 50 random layers: only "no blow-up"
            failures.append(name)
    try:
        import onnx  # noqa: F401

        folded = wszoo.fold_ws(wszoo.create_model("nf_resnet50").eval())
        torch.onnx.export(folded, (torch.randn(1, 3, 224, 224),), str(out / "nf_resnet50_folded.onnx"))
        report["onnx_export"] = (out / "nf_resnet50_folded.onnx").stat().st_size > 0
        (out / "nf_resnet50_folded.onnx").unlink()
    except ImportError:
        report["onnx_export"] = "onnx not installed"
    except Exception as e:  # report, don't hide
        report["onnx_export"] = f"failed: {type(e).__name__}: {e}"
        failures.append("onnx")
    print("onnx export:", report["onnx_export"], flush=True)
    bench = run_benchmarks(("resnetv2_50x1_bit", "nf_resnet50", "resnet50_gn_ws"), device="cuda", train_batch=32,
                           eval_batch=32, repeats=10, eval_repeats=50, warmup=3, tune_allocator=False)
    write_report(bench, str(out / "bench_cuda.json"))
    print(format_report(bench), flush=True)
    report["failures"] = failures
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print("FAILURES:", failures or "none")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out"))
