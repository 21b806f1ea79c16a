"""Section 2, the main table: forward+backward of WKV-7 (ours vs fla), sparse attention (ours vs
dense SDPA) and the layer pair (an RWKV-7 block + a sparse block vs a dense attention block), and
which backend ``auto`` picks at each length; then the summary (speed-ups) and its table."""
from __future__ import annotations

import time
import traceback

import torch

from megatron_rwkvx.kernels.sparse_attention import SPARSE_ATTENTION, dense_causal_attention, topk_chunk_attention
from megatron_rwkvx.kernels.wkv7 import WKV7, wkv7

from .bench import Bench, Unavailable, error_status, grad_step, is_oom


def timing_plan(bench: Bench, lengths, cfg):
    """[(T, case name, build)] where build() returns (step, note)."""
    H, D, chunk, top_k = cfg["heads"], cfg["head_size"], cfg["chunk"], cfg["top_k"]
    C = H * D
    wkv_ours, sparse_ours = cfg["wkv_backend"], cfg["sparse_backend"]
    blocks = {}

    def wkv_case(T, backend):
        def build():
            if backend == "fla":
                if not bench.cuda:
                    raise Unavailable("fla needs CUDA: skipped")
                if "fla" not in WKV7.available():
                    raise Unavailable(f"fla not importable: {WKV7.load_error('fla')}")
            xs = [t.requires_grad_(True) for t in bench.wkv_inputs(1, T, H, D, bench.dtype, seed=T)]
            return grad_step(lambda *a: wkv7(*a, backend=backend), xs), f"wkv7 backend={backend}"
        return build

    def attn_case(T, sparse):
        def build():
            q, k, v = (bench.randn(1, T, H, D, seed=T + i).to(bench.dtype).requires_grad_(True) for i in range(3))
            if sparse:
                fn = lambda q, k, v: topk_chunk_attention(  # noqa: E731
                    q, k, v, chunk_size=chunk, top_k=top_k, backend=sparse_ours)
                return grad_step(fn, (q, k, v)), f"backend={sparse_ours} chunk={chunk} top_k={top_k}"
            note = "SDPA is_causal, flash backend" if bench.cuda else "SDPA (CPU)"
            return grad_step(dense_causal_attention, (q, k, v)), note
        return build

    def layer_case(T, kind):
        def build():
            if not blocks:
                try:
                    from .layers import block_names, build_blocks
                except ImportError as exc:  # megatron-core missing on this machine
                    raise Unavailable(f"the project's layers need megatron-core: {exc}") from exc
                blocks.update(build_blocks(bench.device, bench.dtype, C, D, chunk, top_k, wkv_ours, sparse_ours))
                cfg["layers"] = block_names(blocks)
            block = blocks[kind]
            x = (bench.randn(T, 1, C, seed=T) * 0.5).to(bench.dtype).requires_grad_(True)
            params = [p for p in block.parameters() if p.requires_grad]
            if kind == "rwkv7":  # a later RWKV block: v_first comes from the first one
                v_first = (bench.randn(T, 1, C, seed=T + 1) * 0.5).to(bench.dtype).requires_grad_(True)
                return grad_step(block, (x, v_first), params), f"{type(block.mixer).__name__} block width {C}"
            mode = block.mixer.config.attention_mode
            backend = "sdpa" if mode == "dense" else block.mixer.config.sparse_attention_backend
            return grad_step(block, (x,), params), f"{type(block.mixer).__name__} block width {C} ({mode}, backend={backend})"
        return build

    plan = []
    for T in lengths:
        plan += [
            (T, "wkv7_ours", wkv_case(T, wkv_ours)),
            (T, "wkv7_fla", wkv_case(T, "fla")),
            (T, "sparse_ours", attn_case(T, True)),
            (T, "sdpa_dense", attn_case(T, False)),
            (T, "block_rwkv7", layer_case(T, "rwkv7")),
            (T, "block_sparse", layer_case(T, "sparse")),
            (T, "block_dense", layer_case(T, "dense")),
        ]
    return plan


def run_timing(bench: Bench, lengths, cfg, budget_s):
    rows = []
    for T, name, build in timing_plan(bench, lengths, cfg):
        row = {"T": T, "case": name}
        if bench.elapsed() > budget_s:
            row["status"] = bench.skipped(budget_s)
            rows.append(row)
            continue
        reps = bench.reps(cfg, T)
        t0, step = time.time(), None
        try:
            if bench.cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            step, note = build()
            row["note"] = note
            row["ms"] = bench.time_fwd_bwd(step, cfg["warmup"], reps)
            row["reps"] = reps
            row["status"] = "ok"
            if bench.cuda:
                row["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        except Unavailable as exc:
            row["status"] = f"unavailable: {exc}"
        except Exception as exc:  # OOM or a broken case: record it, go on
            row["status"] = error_status(exc)
            if not is_oom(exc):
                row["traceback"] = traceback.format_exc()[-2000:]
        finally:
            step = None  # noqa: F841  (drops the inputs and graph before the next case)
            bench.free()
        row["case_s"] = round(time.time() - t0, 1)  # wall time, compile and autotune included
        row["elapsed_s"] = round(bench.elapsed(), 1)
        took = f" {row['ms']:.2f} ms" if "ms" in row else ""
        print(f"[{bench.elapsed():6.1f}s] T={T:>6} {name:13s} {row['status']}{took} ({row['case_s']} s)", flush=True)
        rows.append(row)
    return rows


def auto_choices(bench: Bench, lengths, cfg, budget_s):
    """Which backend ``auto`` picks for a run of each length (B=1, the table's heads, the run's
    dtype), probed afresh at each length, and why."""
    H, D = cfg["heads"], cfg["head_size"]
    call = dict(chunk_size=cfg["chunk"], top_k=cfg["top_k"], scale=D ** -0.5, kv_heads=H)
    rows = []
    for T in lengths:
        like = torch.empty(1, 1, H, D, device=bench.device, dtype=bench.dtype).expand(1, T, H, D)
        for op in (WKV7, SPARSE_ATTENTION):
            row = {"T": T, "operator": op.name}
            rows.append(row)
            if bench.elapsed() > budget_s:
                row["status"] = bench.skipped(budget_s)
                continue
            op.forget_choices()
            try:
                choice = op.report("auto", like, call)
                row.update(status="ok", backend=choice.backend, reason=choice.reason,
                           probe_ms=dict(choice.timings_ms))
            except Exception as exc:  # no exact backend, a probe error: recorded
                row["status"] = error_status(exc)
            finally:
                op.forget_choices()
                bench.free()
            print(f"[{bench.elapsed():6.1f}s] auto T={T:>6} {op.name:16s} "
                  f"{row.get('backend', row['status'])}", flush=True)
    return rows


def summarize(rows, lengths):
    """Speed-up rows: baseline ms / ours ms (> 1: ours faster)."""
    out = []
    by = {(r["T"], r["case"]): r for r in rows}

    def ms(T, case):
        r = by.get((T, case), {})
        return r.get("ms"), r.get("status", "missing")

    for T in lengths:
        for label, ours, base in (
            ("WKV-7 ours vs fla", "wkv7_ours", "wkv7_fla"),
            ("sparse attn vs SDPA", "sparse_ours", "sdpa_dense"),
        ):
            o, so = ms(T, ours)
            b, sb = ms(T, base)
            out.append({"T": T, "what": label, "ours_ms": o, "baseline_ms": b,
                        "speedup": (b / o) if (o and b) else None,
                        "note": "" if (o and b) else f"ours: {so}; baseline: {sb}"})
        r, sb_, d = ms(T, "block_rwkv7")[0], ms(T, "block_sparse")[0], ms(T, "block_dense")[0]
        pair = (r + sb_) if (r and sb_) else None
        out.append({"T": T, "what": "layer pair vs dense layer", "ours_ms": pair, "baseline_ms": d,
                    "speedup": (d / pair) if (pair and d) else None,
                    "note": f"pair ns/token {pair / T * 1e6:.0f}" if pair else "missing block timings"})
        if r and sb_ and d:
            # The RWKV-X 3:1 pattern (RRRA) against the same depth of dense attention blocks.
            out[-1]["model_3to1_speedup"] = 4 * d / (3 * r + sb_)
    return out


def print_auto(rows):
    if not rows:
        return
    print("\nauto backend per length (probe: fwd+bwd ms per exact candidate)")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['T']:>7} | {r['operator']:16s} | {r['status']}")
            continue
        probe = ", ".join(f"{n} {ms:.3g}" for n, ms in sorted(r["probe_ms"].items(), key=lambda kv: kv[1]))
        print(f"{r['T']:>7} | {r['operator']:16s} | {r['backend']:9s} | {probe or r['reason']}")


def print_table(meta, checks, summary):
    print()
    print(f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']}")
    for c in checks:
        status = "PASS" if c.get("passed") else ("ERROR" if "error" in c else "FAIL")
        detail = c.get("error", f"worst rms {c.get('worst_rms', float('nan')):.2e} (tol {c.get('tolerance')})")
        extra = f", selection match {c['selection_match']:.4f}" if "selection_match" in c else ""
        print(f"  check {c['check']:30s} {status:5s} {detail}{extra}")
    print()
    print(f"{'T':>7} | {'comparison':27s} | {'ours ms':>9} | {'base ms':>9} | {'speedup':>7} | note")
    print("-" * 90)
    for s in summary:
        o = f"{s['ours_ms']:.2f}" if s["ours_ms"] else "-"
        b = f"{s['baseline_ms']:.2f}" if s["baseline_ms"] else "-"
        sp = f"{s['speedup']:.2f}x" if s["speedup"] else "-"
        note = s["note"]
        if "model_3to1_speedup" in s:
            note += f"; 3:1 model {s['model_3to1_speedup']:.2f}x"
        print(f"{s['T']:>7} | {s['what']:27s} | {o:>9} | {b:>9} | {sp:>7} | {note}")
