"""What the commands share: numeric flags with a valid range (checked before a command runs, one line on error),
the model flags, and small helpers."""
import argparse
import math
import os
import time
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence, Type, TypeVar

import torch

__all__ = ["INTERPOLATIONS", "Range", "ranged", "count_arg", "model_flags", "run_dir_flags", "dense_train_flags",
           "clip_flags", "resolved_clip_flags",
           "count_params", "forward_report", "rank0", "output_defaults_to_resume", "config_from_args"]

_Config = TypeVar("_Config")

#: timm's interpolation names (``timm.data.transforms.str_to_interp_mode``), 'random' aside (training only)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")


@dataclass(frozen=True)
class Range:
    """A numeric flag's valid range, checked after parsing so a bad value is one line and exit code 2."""

    flag: str
    dest: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def check(self, value: Any) -> None:
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is None:
                continue
            bad = not math.isfinite(v) or (self.low is not None and (v < self.low or (self.low_open and v == self.low)))
            bad = bad or (self.high is not None and (v > self.high or (self.high_open and v == self.high)))
            if bad:
                raise ValueError(f"{self.flag} must be {self.describe()}, got {v:g}")


def ranged(p: argparse.ArgumentParser, *flags: str, low: Optional[float] = None, high: Optional[float] = None,
            low_open: bool = False, high_open: bool = False, **kwargs: Any) -> None:
    """``p.add_argument`` plus a valid range, checked by :func:`main` before the command runs."""
    action = p.add_argument(*flags, **kwargs)
    ranges = list(p.get_default("ranges") or [])
    ranges.append(Range(next((f for f in flags if f.startswith("--")), flags[0]), action.dest, low, high,
                         low_open, high_open))
    p.set_defaults(ranges=ranges)


def count_arg(p: argparse.ArgumentParser, *flags: str, least: int = 1, **kwargs: Any) -> None:
    """An integer flag of at least ``least``."""
    ranged(p, *flags, type=int, low=least, **kwargs)


def model_flags(p: argparse.ArgumentParser) -> None:
    """The flags that say which model, which weights and which data (eval, finetune)."""
    p.add_argument("--model", required=True, help="arch, arch.tag, hf-hub:org/repo or local-dir:/path")
    p.add_argument("--pretrained", action="store_true", help="load the published weights")
    p.add_argument("--checkpoint", default=None, help="a .safetensors file or a save_pretrained directory")
    p.add_argument("--data-dir", default=None)
    count_arg(p, "--num-classes", default=None)
    p.add_argument("--in-chans", type=int, choices=[1, 3], default=None,
                   help="1 (grayscale) or 3 (RGB) input channels; default the model's")
    count_arg(p, "--img-size", default=None, help="input size (default: the model's pretrained cfg)")
    count_arg(p, "-b", "--batch-size", default=64)
    count_arg(p, "-j", "--workers", least=0, default=0)
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"],
                   help="autocast dtype: bf16 (default) or fp16")


def clip_flags(p: argparse.ArgumentParser) -> None:
    """Gradient clipping (every train command); :func:`resolved_clip_flags` gives ``--clip-grad`` its meaning."""
    p.add_argument("--clip-mode", choices=["none", "norm", "agc"], default="none",
                   help="agc: adaptive gradient clipping (inside the SGD step on the CPU); norm: the global norm")
    ranged(p, "--clip-grad", type=float, default=None, low=0, low_open=True,
           help="AGC's clip factor (default 0.01) or, with --clip-mode norm, the largest gradient norm (required)")


def resolved_clip_flags(args: argparse.Namespace) -> argparse.Namespace:
    """``--clip-grad`` means AGC's factor or a maximum norm, so neither has a default for the other: a norm
    must be given, and a value without a clip mode would be ignored. Fills in AGC's 0.01."""
    if args.clip_mode == "none" and args.clip_grad is not None:
        raise ValueError("--clip-grad sets the clip of --clip-mode agc or norm; pass one of them too")
    if args.clip_mode == "norm" and args.clip_grad is None:
        raise ValueError("--clip-mode norm needs --clip-grad MAX_NORM: the largest global gradient norm kept "
                         "(e.g. 1.0)")
    if args.clip_grad is None:
        args.clip_grad = 0.01
    return args


def run_dir_flags(p: argparse.ArgumentParser) -> None:
    """Where a training run is written, and whether it continues or replaces one (every train command)."""
    p.add_argument("--output", default=None, help="directory for last/, best/, metrics.jsonl and the train state "
                                                  "(default: the --resume directory)")
    p.add_argument("--resume", default=None, help="a previous --output directory to continue from")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output (by default an existing run is refused)")


def dense_train_flags(p: argparse.ArgumentParser, *, epochs: int, batch_size: int, warmup_iters: int) -> None:
    """The training engine's flags that ``detect train`` and ``segment train`` share (the fields of
    :class:`wszoo.training.config.DensePredictionConfig`), with each task's defaults."""
    pretrained = p.add_mutually_exclusive_group()
    pretrained.add_argument("--pretrained-backbone", dest="pretrained_backbone", action="store_true", default=None,
                            help="start from the backbone's published weights (the default when it has some)")
    pretrained.add_argument("--no-pretrained-backbone", dest="pretrained_backbone", action="store_false")
    count_arg(p, "--epochs", default=epochs)
    count_arg(p, "-b", "--batch-size", default=batch_size, help="images per micro-batch per process")
    count_arg(p, "--accum-steps", default=1, help="micro-batches per optimizer step")
    ranged(p, "--lr", type=float, default=0.02, low=0, low_open=True)
    ranged(p, "--weight-decay", type=float, default=1e-4, low=0)
    count_arg(p, "--warmup-iters", least=0, default=warmup_iters, help="optimizer steps of linear warmup")
    clip_flags(p)
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"],
                   help="autocast dtype: bf16 (default) or fp16")
    count_arg(p, "-j", "--workers", least=0, default=0)
    p.add_argument("--seed", type=int, default=0)
    count_arg(p, "--log-interval", least=0, default=20)
    run_dir_flags(p)


def count_params(model: torch.nn.Module) -> int:
    """Every parameter's elements."""
    return sum(p.numel() for p in model.parameters())


def forward_report(model: torch.nn.Module, img_size: Sequence[int], batch_size: int) -> dict:
    """One timed forward pass on random input (a check that the model runs and gives finite outputs)."""
    model.eval()
    x = torch.randn(batch_size, *img_size)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(x)
        seconds = time.perf_counter() - start
    if not torch.isfinite(out).all():
        raise RuntimeError("forward pass produced non-finite outputs")
    return {"input_shape": list(x.shape), "output_shape": list(out.shape), "seconds": round(seconds, 3)}


def rank0() -> bool:
    """True in a single process and in torchrun's rank 0 (read from the environment, so it holds before and
    after the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def output_defaults_to_resume(args: argparse.Namespace) -> None:
    """``--resume runs/x`` alone continues the run in runs/x; without either flag there is no run directory."""
    if args.output is None:
        if not args.resume:
            raise ValueError("--output DIR is required: where the run is written (or --resume DIR alone, to "
                             "continue the run in DIR)")
        args.output = args.resume


def config_from_args(cls: Type[_Config], args: argparse.Namespace, **overrides: Any) -> _Config:
    """The config dataclass ``cls`` from the parsed flags: each field from the flag of the same name (its
    ``dest``), ``overrides`` for fields whose flag says it otherwise (``--no-accumulate-ws``)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})
