"""Sections 4 and 5, the variant sweeps: ``wkv7_triton`` at each chunk size and pair mode against
the default call and fla; our sparse attention with autotuned blocks, a 128-pair tile and the
fixed blocks against the default; and every autotuner's choices. The Triton modules are imported
when a sweep runs (they need triton)."""
from __future__ import annotations

import inspect
import os
import time
import traceback

import torch

from megatron_rwkvx.kernels.registry import rms_ratio

from .bench import Bench, Unavailable, error_status, grad_step, is_oom
from .timing import timing_plan

VARIANT_CHUNKS = (16, 32, 64)
VARIANT_PAIR_MODES = ("exact", "factored")
NO_PAIR_MODE = "unavailable (no pair_mode)"


def _add_vs_default(rows, skip=None):
    """``vs_default`` = the same T's default ms / this row's ms, on every timed row but ``skip``."""
    for row in rows:
        base = next((r.get("ms") for r in rows if r["T"] == row["T"] and r["variant"] == "default"), None)
        if "ms" in row and row["variant"] != skip:
            row["vs_default"] = base / row["ms"] if base else None


def _variant_label(chunk, mode):
    if chunk is None and mode is None:
        return "default"
    return f"L{chunk}" + (f"/{mode}" if mode else "")


def run_variants(bench: Bench, lengths, cfg, budget_s, main_rows):
    """``wkv7_triton`` at each chunk size and pair mode, fwd+bwd, against the default call."""
    from megatron_rwkvx.kernels.wkv7 import triton_backend as tb  # needs triton: imported on use

    fn0 = tb.wkv7_triton
    params = inspect.signature(fn0).parameters
    pair_ok = "pair_mode" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    H, D = cfg["heads"], cfg["head_size"]
    res = {"lengths": lengths, "chunk_sizes": list(VARIANT_CHUNKS), "pair_modes": list(VARIANT_PAIR_MODES),
           "default_chunk_size": getattr(tb, "DEFAULT_CHUNK_SIZE", None),
           "module_pair_modes": list(getattr(tb, "PAIR_MODES", ())) or None,
           "pair_mode_supported": pair_ok, "tolerance": 2e-2, "rows": []}
    fla_ms = {r["T"]: r["ms"] for r in main_rows if r["case"] == "wkv7_fla" and "ms" in r}
    for T in lengths:
        reps = bench.reps(cfg, T)
        xs = y_def = None
        queue = [(None, None)] + [(L, M) for L in VARIANT_CHUNKS for M in VARIANT_PAIR_MODES]
        if not pair_ok:
            queue += [(L, None) for L in VARIANT_CHUNKS]
        i = 0
        while i < len(queue):
            L, M = queue[i]
            i += 1
            row = {"T": T, "variant": _variant_label(L, M), "chunk_size": L, "pair_mode": M}
            res["rows"].append(row)
            if M is not None and not pair_ok:
                row["status"] = NO_PAIR_MODE
                continue
            if bench.elapsed() > budget_s:
                row["status"] = bench.skipped(budget_s)
                continue
            t0 = time.time()
            kw = {"initial_state": None}
            if L is not None:
                kw["chunk_size"] = L
            if M is not None:
                kw["pair_mode"] = M

            def fn(*a, kw=kw):
                return fn0(*a, **kw)

            try:
                if xs is None:  # the main WKV timing's inputs
                    xs = [t.requires_grad_(True) for t in bench.wkv_inputs(1, T, H, D, bench.dtype, seed=T)]
                with torch.no_grad():
                    y = fn(*xs)[0]
                if L is None and M is None:
                    y_def = y
                elif y_def is not None:
                    row["y_rms_vs_default"] = rms_ratio(y, y_def)
                    row["correct"] = row["y_rms_vs_default"] < res["tolerance"]
                y = None
                row["ms"] = bench.time_fwd_bwd(grad_step(fn, xs), cfg["warmup"], reps)
                row["reps"] = reps
                row["status"] = "ok"
            except TypeError as exc:
                if M is not None and "pair_mode" in str(exc):
                    row["status"] = NO_PAIR_MODE
                    if pair_ok:  # the signature promised it; time the chunk sizes alone instead
                        pair_ok = res["pair_mode_supported"] = False
                        queue += [(L2, None) for L2 in VARIANT_CHUNKS if (L2, None) not in queue]
                else:
                    row["status"] = error_status(exc)
                    row["traceback"] = traceback.format_exc()[-2000:]
            except Exception as exc:
                row["status"] = error_status(exc)
                if not is_oom(exc):
                    row["traceback"] = traceback.format_exc()[-2000:]
            finally:
                y = None
                bench.free()
            row["case_s"] = round(time.time() - t0, 1)
            took = f" {row['ms']:.2f} ms" if "ms" in row else ""
            rms = f", y rms {row['y_rms_vs_default']:.1e}" if "y_rms_vs_default" in row else ""
            print(f"[{bench.elapsed():6.1f}s] variant T={T} {row['variant']:12s} {row['status']}{took}{rms}", flush=True)
        xs = y_def = None
        bench.free()
        if T not in fla_ms and bench.cuda:
            # fla was not timed at this T by the main table: time it here, last.
            row = {"T": T, "variant": "fla", "chunk_size": None, "pair_mode": None}
            res["rows"].append(row)
            if bench.elapsed() > budget_s:
                row["status"] = bench.skipped(budget_s)
            else:
                t0, step = time.time(), None
                try:
                    step, _ = dict((n, b) for _, n, b in timing_plan(bench, [T], cfg))["wkv7_fla"]()
                    row["ms"] = fla_ms[T] = bench.time_fwd_bwd(step, cfg["warmup"], reps)
                    row["status"] = "ok"
                except Unavailable as exc:
                    row["status"] = f"unavailable: {exc}"
                except Exception as exc:
                    row["status"] = error_status(exc)
                finally:
                    step = None  # noqa: F841
                    bench.free()
                row["case_s"] = round(time.time() - t0, 1)
    _add_vs_default(res["rows"], skip="fla")
    for row in res["rows"]:
        if "vs_default" in row:
            row["vs_fla"] = fla_ms[row["T"]] / row["ms"] if row["T"] in fla_ms else None
    res["fla_ms"] = fla_ms
    return res


def print_variants(var):
    if "rows" not in var:
        print(f"\nWKV-7 variants: {var.get('status')}")
        return
    print("\nWKV-7 variants, fwd+bwd (speed-up = other ms / this ms; > 1: this one is faster)")
    print(f"{'T':>7} | {'variant':13s} | {'ms':>8} | {'vs default':>10} | {'vs fla':>7} | y rms vs default")
    for T in var["lengths"]:
        rows = [r for r in var["rows"] if r["T"] == T]
        timed = [r for r in rows if "ms" in r and r["variant"] != "fla"]
        best = min(timed, key=lambda r: r["ms"]) if timed else None
        for r in rows:
            if "ms" not in r:
                print(f"{T:>7} | {r['variant']:13s} | {r['status']}")
                continue
            vd = f"{r['vs_default']:.2f}x" if r.get("vs_default") else "-"
            vf = f"{r['vs_fla']:.2f}x" if r.get("vs_fla") else "-"
            rms = f"{r['y_rms_vs_default']:.1e}" + ("" if r["correct"] else " FAIL") if "y_rms_vs_default" in r else "-"
            mark = " *fastest" if r is best else ""
            print(f"{T:>7} | {r['variant']:13s} | {r['ms']:8.2f} | {vd:>10} | {vf:>7} | {rms}{mark}")


SPARSE_VARIANTS = (
    ("default", {}, True),  # autotuned block sizes, the default pair tile
    ("pair_tile128", {"pair_tile": 128}, True),
    ("fixed_blocks", {}, False),  # RWKVX_TRITON_AUTOTUNE=0: the fixed first-guess blocks
)


def autotune_choices() -> dict:
    """The configurations the autotuners picked so far, per kernel and key (JSON-friendly)."""
    out = {}
    try:
        from megatron_rwkvx.kernels.sparse_attention import triton_backend as sb
        from megatron_rwkvx.kernels.wkv7 import triton_backend as wb
    except Exception as exc:  # an older checkout without autotuned sparse kernels
        return {"error": error_status(exc)}
    tuners = {f"sparse.{n}.d{bd}": t for (n, bd), t in getattr(sb, "_tuned_cache", {}).items() if t is not None}
    tuners.update({f"wkv7.{n}": getattr(wb, n) for n in dir(wb) if n.endswith("_tuned") and hasattr(getattr(wb, n), "cache")})
    for name, tuner in tuners.items():
        for key, config in getattr(tuner, "cache", {}).items():
            out.setdefault(name, []).append({"key": [str(k) for k in key], "config": str(config)})
    return out


def run_sparse_variants(bench: Bench, lengths, cfg, budget_s):
    """Our sparse attention with autotuned blocks (default), a 128-pair tile, and the fixed blocks,
    fwd+bwd, against the default; out against the default's out."""
    from megatron_rwkvx.kernels.sparse_attention.triton_backend import topk_chunk_attention_triton

    H, D, chunk, top_k = cfg["heads"], cfg["head_size"], cfg["chunk"], cfg["top_k"]
    res = {"lengths": lengths, "variants": [v[0] for v in SPARSE_VARIANTS], "tolerance": 2e-2, "rows": []}
    for T in lengths:
        reps = bench.reps(cfg, T)
        qkv = out_def = None
        for name, kw, tune in SPARSE_VARIANTS:
            row = {"T": T, "variant": name}
            res["rows"].append(row)
            if bench.elapsed() > budget_s:
                row["status"] = bench.skipped(budget_s)
                continue
            t0 = time.time()
            old = os.environ.get("RWKVX_TRITON_AUTOTUNE")
            os.environ["RWKVX_TRITON_AUTOTUNE"] = "1" if tune else "0"

            def fn(q, k, v, kw=kw):
                return topk_chunk_attention_triton(q, k, v, chunk_size=chunk, top_k=top_k, **kw)

            try:
                if qkv is None:  # the main table's sparse inputs
                    qkv = [bench.randn(1, T, H, D, seed=T + i).to(bench.dtype).requires_grad_(True) for i in range(3)]
                with torch.no_grad():
                    out = fn(*qkv)
                if out_def is None:
                    out_def = out
                else:
                    row["out_rms_vs_default"] = rms_ratio(out, out_def)
                    row["correct"] = row["out_rms_vs_default"] < res["tolerance"]
                out = None
                row["ms"] = bench.time_fwd_bwd(grad_step(fn, qkv), cfg["warmup"], reps)
                row["reps"] = reps
                row["status"] = "ok"
            except Exception as exc:
                row["status"] = error_status(exc)
                if not is_oom(exc):
                    row["traceback"] = traceback.format_exc()[-2000:]
            finally:
                out = None
                if old is None:
                    os.environ.pop("RWKVX_TRITON_AUTOTUNE", None)
                else:
                    os.environ["RWKVX_TRITON_AUTOTUNE"] = old
                bench.free()
            row["case_s"] = round(time.time() - t0, 1)
            took = f" {row['ms']:.2f} ms" if "ms" in row else ""
            print(f"[{bench.elapsed():6.1f}s] sparse variant T={T} {name:13s} {row['status']}{took}", flush=True)
        qkv = out_def = None
        bench.free()
    _add_vs_default(res["rows"])
    return res


def print_sparse_variants(var):
    if "rows" not in var:
        print(f"\nSparse-attention variants: {var.get('status')}")
        return
    print("\nSparse-attention variants, fwd+bwd (vs default = default ms / this ms)")
    print(f"{'T':>7} | {'variant':13s} | {'ms':>8} | {'vs default':>10} | out rms vs default")
    for r in var["rows"]:
        if "ms" not in r:
            print(f"{r['T']:>7} | {r['variant']:13s} | {r['status']}")
            continue
        vd = f"{r['vs_default']:.2f}x" if r.get("vs_default") else "-"
        rms = f"{r['out_rms_vs_default']:.1e}" + ("" if r["correct"] else " FAIL") if "out_rms_vs_default" in r else "-"
        print(f"{r['T']:>7} | {r['variant']:13s} | {r['ms']:8.2f} | {vd:>10} | {rms}")
