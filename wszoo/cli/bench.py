"""``wszoo bench``: what WS costs, as ratios measured in one run."""
import argparse
from typing import Any

from .flags import count_arg

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """The command's sub-parser, run by :func:`run`."""
    from ..tools.bench import DEFAULT_MODELS

    p = sub.add_parser("bench", help="what WS costs, as ratios: eval (cached vs folded vs timm), train step, "
                                     "micro-batch accumulation, memory")
    p.add_argument("models", nargs="*", default=list(DEFAULT_MODELS), help=f"default: {' '.join(DEFAULT_MODELS)}")
    count_arg(p, "--img-size", default=None, help="default: each model's cfg input size")
    count_arg(p, "--eval-batch", default=8, help="the larger eval batch (batch 1 is always timed)")
    count_arg(p, "--train-batch", default=8)
    count_arg(p, "--accum-steps", default=8, help="micro-batches of one image per optimizer step")
    count_arg(p, "--repeats", default=5, help="timed training steps per variant (best of)")
    count_arg(p, "--eval-repeats", default=20, help="timed batch-1 eval calls per variant (best of)")
    count_arg(p, "--warmup", least=0, default=2)
    count_arg(p, "--threads", default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-timm", action="store_true", help="skip timm's models")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--no-tune-allocator", action="store_true", help="leave glibc's malloc thresholds at their defaults")
    p.add_argument("--detector", choices=["fasterrcnn", "maskrcnn", "retinanet"], default=None,
                   help="time this detector's training step instead (GN+WS vs folded vs torchvision's, at 512 and "
                        "32 box-head samples per image; --img-size default 320, --train-batch 2 recommended)")
    p.add_argument("--backbone", default="resnet50_gn_ws", help="the --detector's backbone")
    p.add_argument("-o", "--output", default=None, help="write the full results as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Time the models (or ``--detector``), print the ratios, write the full report."""
    from ..files import check_writable_parent
    from ..tools.bench import format_report, run_benchmarks, write_report

    if args.output:
        check_writable_parent(args.output, "--output")
    if args.detector:
        from ..detection.bench import run_detector_benchmark

        report = run_detector_benchmark(
            args.detector, args.backbone, tune_allocator=not args.no_tune_allocator, threads=args.threads,
            img_size=args.img_size, train_batch=args.train_batch, repeats=args.repeats, warmup=args.warmup,
            device=args.device)
    else:
        report = run_benchmarks(
            args.models, tune_allocator=not args.no_tune_allocator, threads=args.threads, img_size=args.img_size,
            eval_batch=args.eval_batch, train_batch=args.train_batch, accum_steps=args.accum_steps,
            repeats=args.repeats, eval_repeats=args.eval_repeats, warmup=args.warmup, compare_timm=not args.no_timm,
            channels_last=not args.no_channels_last, device=args.device)
    print(format_report(report))
    if args.output:
        write_report(report, args.output)
        print(f"full results in {args.output}")
    return 0
