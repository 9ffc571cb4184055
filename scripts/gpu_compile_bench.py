"""GPU: does torch.compile remove the WS training-step overhead that eager mode shows on GPU?
(``python scripts/gpu_compile_bench.py OUT_DIR [model ...]`` on a CUDA machine.)

For each model, one SGD training step at batch 32 of the WS model and of its plain-conv copy
(``fold_ws``), eager and ``torch.compile``d (inductor), timed interleaved (best of N, CUDA-synchronized).
Writes OUT_DIR/gpu_compile_bench.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import wszoo
from wszoo.tools.bench import time_interleaved, train_step_fn


def step_fn(model, images, targets):
    return train_step_fn(model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), images, targets)


def main(out_dir: str, models) -> int:
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": 32, "models": {}}
    for name in models:
        torch.manual_seed(0)
        ws = wszoo.create_model(name).to(dev).train()
        plain = wszoo.fold_ws(ws).train()
        size = ws.pretrained_cfg["input_size"][-1]
        images = torch.randn(32, ws.in_chans, size, size, device=dev)
        targets = torch.randint(0, ws.num_classes, (32,), device=dev)
        fns = {"ws_eager": step_fn(ws, images, targets), "plain_eager": step_fn(plain, images, targets)}
        compiled = {"ws_compiled": torch.compile(ws), "plain_compiled": torch.compile(plain)}
        t0 = time.perf_counter()
        for key, model in compiled.items():
            fns[key] = step_fn(model, images, targets)
            for _ in range(3):  # compile + warm up
                fns[key]()
        compile_s = time.perf_counter() - t0
        best = time_interleaved(fns, repeats=10, warmup=1, device=dev)
        entry = {k: round(v * 1e3, 2) for k, v in best.items()}
        entry["eager_ws_vs_plain"] = round(best["ws_eager"] / best["plain_eager"], 3)
        entry["compiled_ws_vs_plain"] = round(best["ws_compiled"] / best["plain_compiled"], 3)
        entry["compile_and_warmup_s"] = round(compile_s, 1)
        results["models"][name] = entry
        print(name, json.dumps(entry), flush=True)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_compile_bench.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:] or ["resnet50_gn_ws", "nf_resnet50", "resnetv2_50x1_bit"]))
