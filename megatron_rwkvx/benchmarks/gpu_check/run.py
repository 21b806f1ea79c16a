"""The GPU check's sections in order, most valuable first, one time budget for every timing
case: correctness; the main table at 16K and 128K; the kernel breakdown; the WKV-7 variants; the
sparse variants; the main table's other lengths; ``auto``'s choice per length. Then the JSON and
the tables (the short summary table last). Exit status 1 when a correctness check failed."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import triton

from megatron_rwkvx.kernels.sparse_attention import available_backends as sparse_backends
from megatron_rwkvx.kernels.wkv7 import available_backends as wkv_backends

from .bench import Bench, error_status
from .breakdown import print_breakdown, run_breakdown
from .cli import settings
from .correctness import correctness_checks
from .sweeps import autotune_choices, print_sparse_variants, print_variants, run_sparse_variants, run_variants
from .timing import auto_choices, print_auto, print_table, run_timing, summarize


def _meta(bench: Bench, args) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name() if bench.cuda
        else f"CPU ({platform.processor() or 'unknown'}), Triton interpreter",
        "capability": list(torch.cuda.get_device_capability()) if bench.cuda else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "mode": "cpu-smoke" if bench.smoke else ("quick" if args.quick else "full"),
        "dtype": str(bench.dtype),
        "sparse_backends": sparse_backends(torch.zeros(1, device=bench.device)),
        "wkv_backends": wkv_backends(torch.zeros(1, device=bench.device)),
    }


def _run_checks(bench: Bench):
    checks = []
    for name, thunk in correctness_checks(bench):
        try:
            res = thunk()
        except Exception as exc:
            res = {"check": name, "passed": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                   "traceback": traceback.format_exc()[-2000:]}
        finally:
            bench.free()
        res["elapsed_s"] = round(bench.elapsed(), 1)
        print(f"[{bench.elapsed():6.1f}s] check {name}: {'PASS' if res.get('passed') else 'FAIL'}", flush=True)
        checks.append(res)
    return checks


def run(args: argparse.Namespace) -> int:
    bench = Bench(smoke=args.cpu_smoke, quick=args.quick)
    meta = _meta(bench, args)
    print(f"gpu_check: {meta['mode']} on {meta['device']}", flush=True)
    sections = {}
    checks = _run_checks(bench)
    sections["checks"] = [0.0, round(bench.elapsed(), 1)]

    plan = settings(args)
    cfg = dict(plan.shape)
    cfg["sparse_backend"] = "triton" if "triton" in meta["sparse_backends"] else "torch"
    cfg["wkv_backend"] = "triton" if "triton" in meta["wkv_backends"] else "torch"
    budget = meta["budget_s"] = plan.budget_s

    def section(name, fn, skip_reason):
        """Run one section unless skipped; an unexpected error is recorded, never raised."""
        if skip_reason:
            return {"status": f"skipped ({skip_reason})"}
        t0 = round(bench.elapsed(), 1)
        try:
            out = fn()
        except Exception as exc:
            out = {"status": error_status(exc), "traceback": traceback.format_exc()[-2000:]}
            print(f"[{bench.elapsed():6.1f}s] {name}: {out['status']}", flush=True)
        sections[name] = [t0, round(bench.elapsed(), 1)]
        return out

    lengths = plan.lengths
    first = [T for T in (16384, 131072) if T in lengths]
    rest = [T for T in lengths if T not in first]
    skip = "--skip-timing" if args.skip_timing else None
    rows = section("timing_first", lambda: run_timing(bench, first, cfg, budget), skip) if first else []
    rows = rows if isinstance(rows, list) else []
    breakdown = section("breakdown", lambda: run_breakdown(bench, plan.profile_length, cfg, budget),
                        skip or ("--no-profile" if args.no_profile else None))
    variants = section("variants", lambda: run_variants(bench, plan.variant_lengths, cfg, budget, rows),
                       skip or ("--no-variants" if args.no_variants else None))
    no_sparse = "--no-sparse-variants" if args.no_sparse_variants else None
    if cfg["sparse_backend"] != "triton":
        no_sparse = no_sparse or "no triton sparse backend"
    sparse_variants = section("sparse_variants",
                              lambda: run_sparse_variants(bench, plan.sparse_variant_lengths, cfg, budget),
                              skip or no_sparse)
    if rest:
        more = section("timing_rest", lambda: run_timing(bench, rest, cfg, budget), skip)
        rows += more if isinstance(more, list) else []
    auto = section("auto", lambda: auto_choices(bench, sorted(lengths), cfg, budget), skip)
    auto = auto if isinstance(auto, list) else []
    summary = summarize(rows, sorted(lengths)) if rows else []

    meta["megatron_imported"] = "megatron.core" in sys.modules
    meta["total_s"] = round(bench.elapsed(), 1)
    results = {"meta": meta, "config": cfg, "lengths": lengths, "sections_s": sections, "checks": checks,
               "timing": rows, "summary": summary, "breakdown": breakdown, "variants": variants,
               "sparse_variants": sparse_variants, "auto": auto, "autotune_choices": autotune_choices()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    print_breakdown(breakdown)
    print_variants(variants)
    print_sparse_variants(sparse_variants)
    print_auto(auto)
    print_table(meta, checks, summary)
    return 0 if all(c.get("passed") for c in checks) else 1
