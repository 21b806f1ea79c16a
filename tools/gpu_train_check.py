#!/usr/bin/env python
"""The trainer on a GPU: the real ``megatron_rwkvx.pretrain`` loop on one GPU in bf16 with the
Triton kernels, a 0.2B RWKV-X (RRRA x 4, C = 768) at 16K and 64K: tokens/s, MFU, peak memory
against the planner's prediction, with and without recompute, the dense-attention baseline of
the same size with the ratio sparse/dense, a wider model if the budget allows, and the first
steps' losses against an fp32 CPU run from the same weights and batches. Prints a markdown table,
writes the figures to --output. The work lives in ``megatron_rwkvx/benchmarks/gpu_train_check/``;
``docs/benchmarks/gpu_train.md`` has the prepared device command.

    python tools/gpu_train_check.py --output train.json               # GPU, --budget-s 420
    python tools/gpu_train_check.py --smoke --output smoke.json       # tiny, CPU, fp32 (tests)
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from megatron_rwkvx.benchmarks.checkout import make_kernels_importable

    make_kernels_importable(REPO)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # one configuration, started by the run below
        from megatron_rwkvx.benchmarks.gpu_train_check.worker import main as worker

        return worker(*argv[1:])
    from megatron_rwkvx.benchmarks.gpu_train_check.cli import build_parser, check
    from megatron_rwkvx.benchmarks.gpu_train_check.run import run

    parser = build_parser()
    return run(check(parser, parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
