"""Benchmarks of the RWKV-7 WKV operator, printed as ratios against a baseline timed in the same run.

Sections (``--sections``, comma separated; each is a function ``section_<name>(args)``):

* ``op``: forward and forward+backward tokens/s of the ``chunked`` backend against the ``naive``
  token loop, B=1, H heads of N=64, for each ``--lengths``; naive is skipped above
  ``--naive-max-len`` (it is a Python loop: its cost per token is flat, so its time at longer T
  adds nothing but minutes) and the ratio there uses its throughput at the longest measured T.

A later section (the whole model against the ``rwkv`` package) plugs in by adding a
``section_<name>`` function and its name to ``SECTIONS``.

Times are the minimum over ``--repeats`` runs of process CPU time by default (``--clock cpu``):
on a shared machine, wall time also counts the time other processes hold the cores.

    python tools/bench_wkv.py --sections op --lengths 1024,2048,4096,8192,16384
"""
from __future__ import annotations

import argparse
import platform
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from megatron_rwkvx.kernels.wkv7 import wkv7


def model_like_inputs(B: int, T: int, H: int, N: int, seed: int = 0) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=gen) for _ in range(3))
    w = -0.6065 * torch.rand(B, T, H, N, generator=gen).clamp_min(1e-4)
    kk = F.normalize(torch.randn(B, T, H, N, generator=gen), dim=-1)
    a, b = -kk, kk * torch.sigmoid(torch.randn(B, T, H, N, generator=gen))
    return [r, w, k, v, a, b]


def timed(fn: Callable[[], None], repeats: int, clock: str) -> float:
    now = time.process_time if clock == "cpu" else time.perf_counter
    fn()  # warm-up (allocator, lazy imports)
    best = float("inf")
    for _ in range(repeats):
        t0 = now()
        fn()
        best = min(best, now() - t0)
    return best


def op_times(backend: str, inputs: List[torch.Tensor], repeats: int, clock: str) -> Dict[str, float]:
    leaves = [t.clone().requires_grad_() for t in inputs]

    def forward():
        with torch.no_grad():
            wkv7(*inputs, backend=backend)

    def forward_backward():
        y, s = wkv7(*leaves, backend=backend)
        (y.sum() + s.sum()).backward()
        for t in leaves:
            t.grad = None

    return {"fwd": timed(forward, repeats, clock), "fwd+bwd": timed(forward_backward, repeats, clock)}


def section_op(args) -> None:
    lengths = [int(x) for x in args.lengths.split(",")]
    H, N = args.heads, 64
    print(f"\n## op: wkv7 chunked vs naive (B=1, H={H}, N={N}, fp32, chunk 16, {args.clock} time)")
    print(f"{'T':>6} | {'naive fwd tok/s':>15} {'chunked fwd tok/s':>17} {'ratio':>6} | "
          f"{'naive f+b tok/s':>15} {'chunked f+b tok/s':>17} {'ratio':>6} | note")
    naive_rate = None
    for T in lengths:
        inputs = model_like_inputs(1, T, H, N)
        chunked = op_times("chunked", inputs, args.repeats, args.clock)
        note = ""
        if T <= args.naive_max_len:
            naive = op_times("naive", inputs, args.naive_repeats, args.clock)
            naive_rate = {key: T / sec for key, sec in naive.items()}
        elif naive_rate is None:
            raise SystemExit("--naive-max-len is below every length: nothing to compare against")
        else:
            note = "naive not run: its tokens/s at the longest measured T"
        rate = {key: T / sec for key, sec in chunked.items()}
        print(f"{T:>6} | {naive_rate['fwd']:>15.0f} {rate['fwd']:>17.0f} "
              f"{rate['fwd'] / naive_rate['fwd']:>5.1f}x | {naive_rate['fwd+bwd']:>15.0f} "
              f"{rate['fwd+bwd']:>17.0f} {rate['fwd+bwd'] / naive_rate['fwd+bwd']:>5.1f}x | {note}",
              flush=True)


SECTIONS: Dict[str, Callable] = {"op": section_op}


def section_model(args) -> None:
    """Whole-model forward: our RWKVXModel vs the `rwkv` package's RWKV_x070 sequence forward
    (CPU fp32, same random official-layout checkpoint, 4 layers of width 256)."""
    import os
    import tempfile

    os.environ["RWKV_V7_ON"] = "1"
    import megatron_rwkvx
    from megatron_rwkvx.config import RWKVXConfig
    from megatron_rwkvx.testing.checkpoints import random_official_state_dict

    try:
        from rwkv.model import RWKV
    except ImportError:
        print("model: the rwkv package is not installed; skipped")
        return
    cfg = RWKVXConfig(hidden_size=256, head_size=64, num_layers=4, vocab_size=65536)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.pth")
        torch.save(random_official_state_dict(cfg, seed=0), path)
        ours = megatron_rwkvx.load_pretrained(path)
        ref = RWKV(path[: -len(".pth")], "cpu fp32")
        print("model forward (B=1, width 256, 4 layers): tokens/s, ours vs rwkv package")
        print(f"{'T':>7} {'ours':>10} {'rwkv pkg':>10} {'ratio':>7}")
        for t in [int(x) for x in args.lengths.split(",")]:
            tokens = torch.randint(0, cfg.vocab_size, (1, t))
            with torch.no_grad():
                a = timed(lambda: ours(tokens), args.repeats, args.clock)
                b = timed(lambda: ref.forward(tokens[0].tolist(), None, full_output=True), 1, args.clock)
            print(f"{t:>7} {t / a:>10.0f} {t / b:>10.0f} {b / a:>6.1f}x", flush=True)


SECTIONS["model"] = section_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="op", help=f"comma separated, from {sorted(SECTIONS)}")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--naive-max-len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {sorted(SECTIONS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    for name in args.sections.split(","):
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
