"""Section 3, the kernel breakdown at one length: forward alone vs forward+backward, and one
forward+backward under ``torch.profiler`` (CUDA activity): each GPU kernel's calls and total ms,
and the step's wall time minus the time the GPU was busy in kernels (gaps: host syncs, launch
overhead)."""
from __future__ import annotations

import math
import re
import time
import traceback

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from .bench import Bench, Unavailable, error_status, is_oom
from .timing import timing_plan

BREAKDOWN_CASES = ("wkv7_ours", "wkv7_fla", "sparse_ours")


def _short_name(name: str, width: int = 56) -> str:
    """A GPU kernel's name without ``void``, namespaces and its argument list, at most ``width``."""
    n = name.strip()
    if n.startswith("void "):
        n = n[5:]
    n = n.replace("(anonymous namespace)::", "")
    n = re.sub(r"\b[A-Za-z_]\w*::", "", n)
    n = n.split("(", 1)[0].strip() or name.strip()
    return n if len(n) <= width else n[: width - 2] + ".."


def profile_step(bench: Bench, step, top: int = 15) -> dict:
    """One ``step()`` under ``torch.profiler``: per kernel (shortened name) the calls and total ms,
    and the step's wall time minus the time the GPU was busy in kernels (gaps). On the CPU
    (interpreter) it records CPU activity: torch ops with their self time (the interpreted Triton
    kernels' time lands in their autograd functions' self time)."""
    if not bench.cuda:
        return _profile_once(bench, step, [ProfilerActivity.CPU], top)
    try:
        return _profile_once(bench, step, [ProfilerActivity.CUDA], top)
    except _NoEvents as exc:  # some builds list kernels only with CPU activity on as well
        out = _profile_once(bench, step, [ProfilerActivity.CPU, ProfilerActivity.CUDA], top)
        out["note"] = f"CUDA activity alone: {exc}; retried with CPU+CUDA activity (gaps inflated)"
        return out


class _NoEvents(RuntimeError):
    pass


def _profile_once(bench: Bench, step, activities, top):
    cuda = bench.cuda
    bench.sync()
    with profile(activities=activities) as prof:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            wall = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            step()
            wall = (time.perf_counter() - t0) * 1e3
    want = DeviceType.CUDA if cuda else DeviceType.CPU
    groups, spans = {}, []
    for e in prof.events():
        if e.device_type != want:
            continue
        if cuda:
            t_start, t_end = e.time_range.start, e.time_range.end
            spans.append((t_start, t_end))
            us = t_end - t_start
        else:
            us = e.self_cpu_time_total
        short = _short_name(e.name)
        g = groups.setdefault(short, {"name": short, "calls": 0, "ms": 0.0, "full_name": e.name[:300]})
        g["calls"] += 1
        g["ms"] += us / 1e3
    if not groups:
        raise _NoEvents(f"the profiler recorded no {'GPU kernel' if cuda else 'CPU'} events"
                        + (" (CUPTI unavailable?)" if cuda else ""))
    kernel_ms = sum(g["ms"] for g in groups.values())
    busy_ms = kernel_ms
    if cuda:  # the union of the kernels' intervals (one stream: no overlap, but be safe)
        busy_us, reach = 0.0, -math.inf
        for t_start, t_end in sorted(spans):
            if t_end > reach:
                busy_us += t_end - max(t_start, reach)
                reach = t_end
        busy_ms = busy_us / 1e3
    ranked = sorted(groups.values(), key=lambda g: -g["ms"])
    rest = ranked[top:]
    return {
        "activity": "+".join(str(a).split(".")[-1].lower() for a in activities)
        + ("" if cuda else " (interpreter: torch ops, self time)"),
        "wall_ms": wall, "kernel_ms": kernel_ms, "busy_ms": busy_ms,
        "gap_ms": max(0.0, wall - busy_ms), "gap_share": max(0.0, wall - busy_ms) / wall if wall > 0 else None,
        "n_events": sum(g["calls"] for g in ranked), "n_kinds": len(ranked),
        "kernels": ranked[:top],
        "other": {"kinds": len(rest), "calls": sum(g["calls"] for g in rest), "ms": sum(g["ms"] for g in rest)},
    }


def run_breakdown(bench: Bench, T, cfg, budget_s):
    """Forward alone, forward+backward, and one profiled forward+backward per case at length T."""
    res = {"T": T, "cases": []}
    builds = {name: build for _, name, build in timing_plan(bench, [T], cfg)}
    reps = bench.reps(cfg, T)
    for name in BREAKDOWN_CASES:
        row = {"case": name}
        res["cases"].append(row)
        if bench.elapsed() > budget_s:
            row["status"] = bench.skipped(budget_s)
            continue
        t0, step = time.time(), None
        try:
            step, row["note"] = builds[name]()
            step()  # warm-up: compiles and autotunes
            step.forward()
            bench.sync()
            row["fwd_ms"] = bench.time_fwd_bwd(step.forward, 0, reps)
            row["fwd_bwd_ms"] = bench.time_fwd_bwd(step, 0, reps)
            row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
            row["reps"] = reps
            row["status"] = "ok"
            try:
                row["profile"] = profile_step(bench, step)
            except Exception as exc:  # CUPTI missing, a profiler bug, OOM: the timings stand
                row["profile_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        except Unavailable as exc:
            row["status"] = f"unavailable: {exc}"
        except Exception as exc:
            row["status"] = error_status(exc)
            if not is_oom(exc):
                row["traceback"] = traceback.format_exc()[-2000:]
        finally:
            step = None  # noqa: F841
            bench.free()
        row["case_s"] = round(time.time() - t0, 1)
        took = f" fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['fwd_bwd_ms']:.2f} ms" if "fwd_bwd_ms" in row else ""
        prof = " (profile: " + ("ok" if "profile" in row else row.get("profile_error", "-")[:80]) + ")"
        print(f"[{bench.elapsed():6.1f}s] breakdown T={T} {name:12s} {row['status']}{took}"
              f"{prof if row['status'] == 'ok' else ''}", flush=True)
    return res


def print_breakdown(bd, top=8):
    if "cases" not in bd:
        print(f"\nkernel breakdown: {bd.get('status')}")
        return
    print(f"\nkernel breakdown at T={bd['T']} (fwd+bwd; per kernel: total ms, calls; gaps = wall - kernel busy)")
    for row in bd["cases"]:
        if row.get("status") != "ok":
            print(f"  {row['case']:12s} {row.get('status')}")
            continue
        head = (f"  {row['case']:12s} fwd {row['fwd_ms']:.2f} | bwd {row['bwd_ms']:.2f} | "
                f"fwd+bwd {row['fwd_bwd_ms']:.2f} ms")
        prof = row.get("profile")
        if prof is None:
            print(f"{head}; profile: {row.get('profile_error')}")
            continue
        share = f" ({100 * prof['gap_share']:.1f}%)" if prof["gap_share"] is not None else ""
        print(f"{head}; profiled {prof['wall_ms']:.2f} = kernels {prof['busy_ms']:.2f} + gaps "
              f"{prof['gap_ms']:.2f}{share}; {prof['n_events']} launches")
        for g in prof["kernels"][:top]:
            print(f"      {g['ms']:9.3f} ms {g['calls']:5d}x  {g['name']}")
        rest = prof["kernels"][top:]
        n_rest = len(rest) + prof["other"]["kinds"]
        if n_rest:
            ms = sum(g["ms"] for g in rest) + prof["other"]["ms"]
            print(f"      {ms:9.3f} ms        ({n_rest} more kinds)")
