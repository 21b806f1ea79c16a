"""The trainer check's command line (``tools/gpu_train_check.py``)."""
from __future__ import annotations

import argparse

DESCRIPTION = ("The trainer on a GPU: the real pretrain loop in bf16 with the Triton kernels; "
               "tokens/s, MFU, peak memory against the planner, recompute modes, the dense-attention "
               "baseline, and the first losses against an fp32 CPU run.")


def _lengths(text: str):
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, fp32, CPU, T=64, 2 steps per configuration: every code path (tests)")
    p.add_argument("--output", default=None, help="write the figures as JSON to this path")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="no configuration starts after this many seconds; the rest are listed as skipped")
    p.add_argument("--lengths", type=_lengths, default=None,
                   help="comma-separated sequence lengths (default 16384,65536; --smoke 64)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per configuration (default 5; --smoke 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed first steps (compile, autotune; default 2; --smoke 1)")
    p.add_argument("--wide-width", type=int, default=2048,
                   help="width of the larger model (same pattern), run last if the budget allows; 0: none")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak bf16 TFLOP/s for MFU (default: the trainer's, 989 = H100/H200 dense)")
    p.add_argument("--loss-steps", type=int, default=3, help="steps of the GPU-vs-CPU loss comparison")
    p.add_argument("--loss-rtol", type=float, default=2e-2,
                   help="largest relative difference of a step's loss, bf16 GPU vs fp32 CPU")
    p.add_argument("--case-timeout-s", type=float, default=300.0,
                   help="a configuration's process is stopped after this many seconds")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of each configuration's process (default: torch's; --smoke 1, "
                        "as tiny steps on a shared CPU stall when threads spin-wait)")
    p.add_argument("--work-dir", default=None, help="initial weights and per-case files (default: a temporary directory)")
    return p


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the mode's defaults and refuse impossible values."""
    args.lengths = args.lengths or ([64] if args.smoke else [16384, 65536])
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 5)
    args.threads = args.threads if args.threads is not None else (1 if args.smoke else None)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    if args.warmup < 0 or args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}): at least one step is timed")
    if args.loss_steps < 1:
        p.error("--loss-steps must be >= 1")
    return args
