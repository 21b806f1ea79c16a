"""Per-rank compute of the context-parallel RWKV-7 recurrence, as a ratio to the plain kernel.

Times, for one rank's shard of ``--shard`` tokens, the work ``wkv7_context_parallel`` does besides
communication (the doubled-batch ``wkv7_shard_summary`` plus the rerun from the incoming state)
against one ``wkv7`` call on the same shard (what the rank would run without the state hand-off).
Communication is left out: it is ``2 * cp * B * H * N^2`` fp32 values per layer, whatever the
shard length (docs/parallelism.md). Single process; no process group needed.

    python tools/bench_context_parallel.py --shard 2048 --heads 4 --repeats 3
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from megatron_rwkvx.kernels.wkv7 import wkv7
from megatron_rwkvx.parallel.cp_wkv7 import wkv7_shard_summary


def inputs(B, T, H, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = -0.6065 * torch.sigmoid(torch.randn(B, T, H, N, generator=g))
    kk = F.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    rate = torch.sigmoid(torch.randn(B, T, H, N, generator=g))
    return [t.requires_grad_() for t in (r, w, k, v, -kk, kk * rate)]


def best_cpu_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shard", type=int, default=2048, help="tokens per CP rank")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--backend", default="chunked")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    B, T, H, N = args.batch, args.shard, args.heads, args.head_size
    x = inputs(B, T, H, N)
    s_in = torch.randn(B, H, N, N) * 0.1

    def plain(backward):
        y, s = wkv7(*x, backend=args.backend)
        if backward:
            (y.sum() + s.sum()).backward()

    def cp_local(backward):
        m, s_loc = wkv7_shard_summary(*x, backend=args.backend)
        # Stands in for the fold over the predecessors (a few N x N products).
        start = s_in @ m.detach() + s_loc.detach()
        y, s = wkv7(*x, start.requires_grad_(), backend=args.backend)
        if backward:
            (y.sum() + s.sum() + (m * s_in).sum() + s_loc.sum()).backward()

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {args.threads}, B={B} shard={T} H={H} N={N} fp32 backend={args.backend}")
    print("| pass | plain wkv7 (s) | CP local work (s) | ratio |")
    print("|---|---:|---:|---:|")
    for name, backward in (("forward", False), ("forward+backward", True)):
        base = best_cpu_time(lambda: plain(backward), args.repeats)
        cp = best_cpu_time(lambda: cp_local(backward), args.repeats)
        print(f"| {name} | {base:.3f} | {cp:.3f} | {cp / base:.2f}x |")


if __name__ == "__main__":
    main()
