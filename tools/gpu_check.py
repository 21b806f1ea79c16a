"""One prepared GPU check of the kernels and layers: correctness in bf16, then forward+backward timings.

Written for a GPU lent for a few minutes (H100/H200): it must finish in under 8 minutes, so every
timing case checks a time budget before it starts, and each check and case is guarded so that
one failure (an error, an out-of-memory) is recorded and the rest still run. It prints a short
table last and writes every number to ``--out`` (JSON). Exit status 1 when a correctness check
failed or raised, else 0. The work lives in ``megatron_rwkvx/benchmarks/gpu_check/`` (one module
per section); this file is the command. What each section measures: ``docs/benchmarks/gpu.md``.

Run it from the repository root; an uninstalled checkout works too (``PYTHONPATH=<site>:.``: the
kernels directory is then mapped to ``megatron_rwkvx.kernels`` here). The layer timings build the
project's own blocks and need megatron-core; without it they are recorded as unavailable.

    python tools/gpu_check.py --out gpu.json            # every section (< 8 min on an H200)
    python tools/gpu_check.py --quick --out gpu.json    # T = 4K, 16K, smaller checks (~3 min)
    python tools/gpu_check.py --cpu-smoke --out s.json  # tiny, CPU, Triton interpreter (tests)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _make_kernels_importable() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from megatron_rwkvx.benchmarks.checkout import make_kernels_importable

    make_kernels_importable(REPO)


def main(argv=None) -> int:
    _make_kernels_importable()
    from megatron_rwkvx.benchmarks.gpu_check.cli import build_parser

    args = build_parser().parse_args(argv)
    if args.cpu_smoke:
        # Must precede the first import of triton: triton.jit reads it when kernels are defined.
        os.environ["TRITON_INTERPRET"] = "1"
    from megatron_rwkvx.benchmarks.gpu_check.run import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
