#!/usr/bin/env python
"""Decode cost per token against context length: RWKV-X (exact incremental engine) vs a dense-
attention KV-cache decoder of the same width, depth and vocabulary, measured in the same run.

  python tools/bench_decode.py --contexts 1024,2048,4096,8192,16384,32768,65536 \
      --hidden 768 --pattern RRRARRRARRRARRRA --chunk-size 2048 --top-k 3

For each context N the RWKV-X state is prefilled to N tokens (real prefill, in pieces) and then
``--steps`` decode steps are timed (minimum over ``--repeats`` alternating runs); the dense
decoder's cache is filled with random keys/values of N tokens (its per-token cost does not depend
on their values) and timed the same way. Memory is the bytes of the per-sequence inference state
(RWKV-X: RWKV states + chunked attention caches as allocated; dense: the key/value cache up to N). Printed ratios: dense/RWKV-X time and memory, and
RWKV-X time at N over its time at the smallest context (the flatness target: <= 1.2 at 64K).
"""
from __future__ import annotations

import argparse
import sys
import time


def build_rwkvx(args):
    import torch

    from megatron_rwkvx.config import RWKVXConfig
    from megatron_rwkvx.models.rwkvx_model import RWKVXModel
    from megatron_rwkvx.pretrained import prepare_runtime

    prepare_runtime(torch.device(args.device))
    cfg = RWKVXConfig(hidden_size=args.hidden, head_size=64, vocab_size=args.vocab,
                      layer_pattern=args.pattern, ffn_hidden_size=4 * args.hidden,
                      sparse_chunk_size=args.chunk_size, sparse_top_k=args.top_k,
                      use_cpu_initialization=True, params_dtype=torch.float32)
    model = RWKVXModel(cfg, parallel_output=False).to(args.device).eval()
    with torch.no_grad():
        # Trained attention blocks are not the identity: give the output projections weights so the
        # attention result flows on (it does not change the cost, but keeps the run honest).
        for layer in model.decoder.layers:
            if layer.symbol == "A":
                layer.mixer.output.weight.normal_(0, args.hidden**-0.5)
    return model


class DenseDecoder:
    """Pre-norm transformer decoder (no positional encoding: irrelevant to cost), one sequence,
    with a preallocated key/value cache; attention over every cached token at each step."""

    def __init__(self, hidden: int, layers: int, vocab: int, max_len: int, device: str) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        self.heads, self.d = hidden // 64, 64
        rnd = lambda *s: (torch.randn(*s, generator=g) * s[0] ** -0.5).to(device)  # noqa: E731
        self.emb = rnd(vocab, hidden)
        self.head = rnd(hidden, vocab)
        self.layers = [dict(qkv=rnd(hidden, 3 * hidden), o=rnd(hidden, hidden),
                            up=rnd(hidden, 4 * hidden), down=rnd(4 * hidden, hidden))
                       for _ in range(layers)]
        self.k = torch.zeros(layers, self.heads, max_len, self.d, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def fill(self, n: int) -> None:
        import torch

        self.k[:, :, :n].normal_()
        self.v[:, :, :n].normal_()
        self.length = n

    def memory_bytes(self) -> int:
        return 2 * self.k[:, :, : self.length].numel() * self.k.element_size()

    def step(self, token: int):
        import torch
        import torch.nn.functional as F

        x = self.emb[token][None]
        t = self.length
        for i, p in enumerate(self.layers):
            h = F.layer_norm(x, x.shape[-1:])
            q, k, v = (h @ p["qkv"]).view(3, self.heads, self.d)
            self.k[i, :, t] = k
            self.v[i, :, t] = v
            att = F.scaled_dot_product_attention(q[None, :, None], self.k[i, :, : t + 1][None],
                                                 self.v[i, :, : t + 1][None])
            x = x + att.reshape(1, -1) @ p["o"]
            h = F.layer_norm(x, x.shape[-1:])
            x = x + torch.relu(h @ p["up"]).square() @ p["down"]
        self.length = t + 1
        return F.layer_norm(x, x.shape[-1:]) @ self.head


def timed(fn, steps: int, warmup: int, clock) -> float:
    for _ in range(warmup):
        fn()
    start = clock()
    for _ in range(steps):
        fn()
    return (clock() - start) / steps * 1000.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768,65536")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--pattern", default="RRRARRRARRRARRRA")
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per context")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3,
                   help="time each model this many times per context, alternating; report the minimum")
    p.add_argument("--piece-size", type=int, default=4096, help="RWKV-X prefill tokens per call")
    p.add_argument("--max-cached-chunks", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time (steadier on a shared machine; use with --threads 1)")
    args = p.parse_args(argv)
    try:
        contexts = sorted(int(x) for x in args.contexts.split(",") if x.strip())
    except ValueError:
        p.error(f"--contexts must be comma-separated integers, got {args.contexts!r}")
    if not contexts or contexts[0] < 1:
        p.error("--contexts needs positive lengths")
    if args.hidden % 64:
        p.error("--hidden must be a multiple of 64 (head size 64)")

    import torch

    from megatron_rwkvx.inference import InferenceEngine

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.device != "cpu" and args.clock == "cpu":
        p.error("--clock cpu measures host CPU time; use --clock wall on an accelerator")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_rwkvx(args)
    engine = InferenceEngine(model, max_cached_chunks=args.max_cached_chunks)
    state = engine.new_state(1)
    extra = (args.warmup + args.steps) * args.repeats * len(contexts)
    dense = DenseDecoder(args.hidden, len(args.pattern), args.vocab, contexts[-1] + extra, args.device)
    gen = torch.Generator().manual_seed(0)
    print(f"# {args.pattern} C={args.hidden} vocab={args.vocab} chunk={args.chunk_size} top_k={args.top_k} "
          f"threads={torch.get_num_threads()} device={args.device} clock={args.clock}", flush=True)
    header = ("| context | RWKV-X ms/token | dense ms/token | dense/RWKV-X time | RWKV-X vs first "
              "| RWKV-X state MiB | dense KV MiB | dense/RWKV-X memory | prefill s |")
    print(header + "\n|" + "---|" * 9, flush=True)
    first = None
    for n in contexts:
        todo = n - state.lengths[0]
        t0 = time.perf_counter()
        for start in range(0, max(todo, 0), args.piece_size):
            size = min(args.piece_size, todo - start)
            engine.forward(state, torch.randint(0, args.vocab, (1, size), generator=gen))
        prefill_s = time.perf_counter() - t0
        x_times, d_times = [], []
        with torch.no_grad():
            for _ in range(args.repeats):  # alternate so that both see the same machine conditions
                x_times.append(timed(lambda: engine.decode(state, [1]), args.steps, args.warmup, clock))
                dense.fill(n)
                d_times.append(timed(lambda: dense.step(1), args.steps, args.warmup, clock))
        x_ms, d_ms = min(x_times), min(d_times)
        first = first or x_ms
        x_mem, d_mem = state.memory_bytes(), dense.memory_bytes()
        mib = 1 << 20
        print(f"| {n} | {x_ms:.1f} | {d_ms:.1f} | {d_ms / x_ms:.2f} | {x_ms / first:.2f} "
              f"| {x_mem / mib:.1f} | {d_mem / mib:.1f} | {d_mem / x_mem:.2f} | {prefill_s:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
