"""The GPU check's command line (``tools/gpu_check.py``) and the settings each mode implies."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Optional

DESCRIPTION = "One prepared GPU check of the kernels and layers: correctness in bf16, then timings."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--quick", action="store_true", help="T = 4K and 16K only, smaller checks")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny run on the CPU through Triton's interpreter")
    p.add_argument("--out", type=str, default=None, help="write the results as JSON to this path")
    p.add_argument("--lengths", type=str, default=None, help="comma-separated T list (overrides the default)")
    p.add_argument(
        "--budget-s", type=float, default=None,
        help="no timing case starts after this many seconds (default 400, --quick 200)",
    )
    p.add_argument("--skip-timing", action="store_true", help="correctness checks only")
    p.add_argument("--profile-length", type=int, default=None,
                   help="T of the kernel breakdown (default 65536; 64 with --cpu-smoke)")
    p.add_argument("--no-profile", action="store_true", help="skip the kernel breakdown")
    p.add_argument("--variant-lengths", type=str, default=None,
                   help="comma-separated T list of the WKV-7 variant sweep (default 16384,131072)")
    p.add_argument("--no-variants", action="store_true", help="skip the WKV-7 variant sweep")
    p.add_argument("--sparse-variant-lengths", type=str, default=None,
                   help="comma-separated T list of the sparse-attention variant sweep (default 131072)")
    p.add_argument("--no-sparse-variants", action="store_true", help="skip the sparse-attention variant sweep")
    return p


def _lengths(text: Optional[str]) -> Optional[List[int]]:
    return [int(x) for x in text.split(",")] if text else None


@dataclass
class Settings:
    """What one run measures: lengths of each section, the shapes, and the time budget."""

    lengths: List[int]
    profile_length: int
    variant_lengths: List[int]
    sparse_variant_lengths: List[int]
    shape: dict
    budget_s: float


def settings(args: argparse.Namespace) -> Settings:
    if args.cpu_smoke:
        lengths, profile, variants, sparse_variants = [32], 64, [64], [64]
        shape = dict(heads=2, head_size=16, chunk=16, top_k=3, warmup=0, reps=1)
    else:
        lengths = [4096, 16384] if args.quick else [4096, 16384, 65536, 131072]
        shape = dict(heads=32, head_size=64, chunk=2048, top_k=3, warmup=1, reps=5)
        profile, variants = (16384, [16384]) if args.quick else (65536, [16384, 131072])
        sparse_variants = [16384] if args.quick else [131072]
    return Settings(
        lengths=_lengths(args.lengths) or lengths,
        profile_length=args.profile_length or profile,
        variant_lengths=_lengths(args.variant_lengths) or variants,
        sparse_variant_lengths=_lengths(args.sparse_variant_lengths) or sparse_variants,
        shape=shape,
        budget_s=args.budget_s if args.budget_s is not None else (200.0 if args.quick else 400.0),
    )
