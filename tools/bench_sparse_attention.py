"""Benchmark top-k chunk sparse attention against dense causal attention (SDPA) on this machine.

Each configuration runs in a fresh process. Peak memory is the growth of the resident set over
one forward+backward: the kernel's high-water mark (VmHWM) is reset just before the call
(``/proc/self/clear_refs``, Linux) and compared with the resident set at that moment; glibc is told
to return every large block to the system on free, so reused heap cannot hide an allocation. Times are medians over ``--reps`` runs after a
warm-up. Ratios are dense / sparse: above 1 means the sparse path is faster or smaller.

    python tools/bench_sparse_attention.py                      # T = 4K..32K, chunk 2048 and 512
    python tools/bench_sparse_attention.py --lengths 4096 --reps 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{key} not in /proc/self/status")


def _peak_growth_mib(fn) -> float:
    """Peak resident-set growth while ``fn()`` runs."""
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    fn()
    return _status_mib("VmHWM") - before


def _child(impl: str, t: int, chunk: int, top_k: int, heads: int, head_dim: int, reps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from megatron_rwkvx.kernels.sparse_attention import topk_chunk_attention

    def make(n):
        g = torch.Generator().manual_seed(0)
        return [torch.randn(1, n, heads, head_dim, generator=g).requires_grad_(True) for _ in range(3)]

    def run(q, k, v):
        if impl == "sdpa":
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            ).transpose(1, 2)
        else:
            out = topk_chunk_attention(q, k, v, chunk_size=chunk, top_k=top_k, backend="torch")
        return out

    # Warm-up at a small size: thread pools and kernel caches are not part of the measurement;
    # the measured full-size run then also warms the timed ones.
    run(*make(max(chunk, t // 8))).sum().backward()
    q, k, v = make(t)
    peak_mib = _peak_growth_mib(lambda: run(q, k, v).sum().backward())

    fwd, total = [], []
    for _ in range(reps):
        for p in (q, k, v):
            p.grad = None
        start = time.perf_counter()
        with torch.no_grad():
            run(q, k, v)
        fwd.append(time.perf_counter() - start)
        start = time.perf_counter()
        run(q, k, v).sum().backward()
        total.append(time.perf_counter() - start)
    return {"fwd_s": statistics.median(fwd), "fwd_bwd_s": statistics.median(total), "peak_mib": peak_mib}


def _measure(impl, t, chunk, args) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--child", impl, str(t), str(chunk),
        "--top-k", str(args.top_k), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
        "--reps", str(args.reps), "--threads", str(args.threads),
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{impl} T={t} chunk={chunk} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--chunks", type=int, nargs="+", default=[2048, 512])
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("IMPL", "T", "CHUNK"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        impl, t, chunk = args.child[0], int(args.child[1]), int(args.child[2])
        print(json.dumps(_child(impl, t, chunk, args.top_k, args.heads, args.head_dim, args.reps)))
        return

    print(
        f"torch {torch.__version__}, {args.threads} threads, B=1, H={args.heads}, D={args.head_dim}, "
        f"top_k={args.top_k}, fp32, median of {args.reps}; ratio = dense SDPA / sparse"
    )
    header = (
        f"{'T':>6} {'chunk':>6} | {'sdpa fwd':>9} {'sparse fwd':>10} {'ratio':>6} | "
        f"{'sdpa f+b':>9} {'sparse f+b':>10} {'ratio':>6} | {'sdpa MiB':>8} {'sparse MiB':>10} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for t in args.lengths:
        dense = _measure("sdpa", t, args.chunks[0], args)
        for chunk in args.chunks:
            sparse = _measure("sparse", t, chunk, args)
            print(
                f"{t:>6} {chunk:>6} | {dense['fwd_s']:>8.3f}s {sparse['fwd_s']:>9.3f}s "
                f"{dense['fwd_s'] / sparse['fwd_s']:>6.2f} | {dense['fwd_bwd_s']:>8.3f}s "
                f"{sparse['fwd_bwd_s']:>9.3f}s {dense['fwd_bwd_s'] / sparse['fwd_bwd_s']:>6.2f} | "
                f"{dense['peak_mib']:>8.1f} {sparse['peak_mib']:>10.1f} "
                f"{dense['peak_mib'] / max(sparse['peak_mib'], 0.1):>6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
