#!/usr/bin/env python
"""Estimate per-GPU memory of RWKV-X training layouts and suggest ones that fit.

  python tools/plan_parallelism.py --model 3.6B --seq-length 65536 --gpus 64 --gpu-memory 80
  python tools/plan_parallelism.py --hidden-size 2048 --layer-pattern RRRRA --seq-length 131072 \\
      --gpus 16 --gpu-memory 141 --show 10

The memory model (weights, gradients, optimizer state, activations, logits) is documented in
docs/parallelism.md; it is an estimate for planning, not a guarantee.
"""
from __future__ import annotations

import argparse
import sys

from megatron_rwkvx.models.recompute import GRANULARITIES, METHODS, RecomputeError, check_recompute

PRESETS = {
    # The RWKV-X reference models (docs/design.md): 12 RWKV (C=768) + 4 sparse; 32 RWKV (C=2560) + 8 sparse.
    "0.22B": dict(hidden_size=768, layer_pattern="RRRA" * 4),
    "3.6B": dict(hidden_size=2560, layer_pattern="RRRRA" * 8),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PRESETS), default=None)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--layer-pattern")
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--sparse-chunk-size", type=int, default=2048)
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-memory", type=float, required=True, help="GiB per GPU")
    p.add_argument("--show", type=int, default=8, help="how many layouts to list")
    p.add_argument("--recompute-granularity", choices=GRANULARITIES, default=None)
    p.add_argument("--recompute-method", choices=METHODS, default=None)
    p.add_argument("--recompute-num-layers", type=int, default=None)
    args = p.parse_args(argv)
    recompute = (args.recompute_granularity, args.recompute_method, args.recompute_num_layers)
    try:
        check_recompute(*recompute)
    except RecomputeError as err:
        p.error(str(err))

    from megatron_rwkvx.config import RWKVXConfig
    from megatron_rwkvx.parallel.memory_model import parameter_count, suggest_layouts

    if args.model:
        shape = dict(PRESETS[args.model])
    elif args.hidden_size and args.layer_pattern:
        shape = dict(hidden_size=args.hidden_size, layer_pattern=args.layer_pattern)
    else:
        p.error("give --model or both --hidden-size and --layer-pattern")
    cfg = RWKVXConfig(vocab_size=args.vocab_size, sparse_chunk_size=args.sparse_chunk_size, **shape)
    counts = parameter_count(cfg)
    print(f"model: width {cfg.hidden_size}, pattern {cfg.layer_pattern} "
          f"({cfg.num_rwkv_layers} RWKV + {cfg.num_sparse_layers} sparse), "
          f"{counts['total'] / 1e9:.2f}B parameters")
    print(f"sequence {args.seq_length:,} tokens x micro-batch {args.micro_batch_size}, "
          f"{args.gpus} GPUs of {args.gpu_memory:g} GiB")
    layouts = suggest_layouts(cfg, args.seq_length, args.gpus, args.gpu_memory, args.micro_batch_size,
                              recompute=recompute)
    if not layouts:
        print("no layout fits: add GPUs, shorten the sequence, or use activation recomputation")
        return 1
    print(f"{'TP':>3} {'PP':>3} {'CP':>3} {'DP':>4} | {'weights+grads':>13} {'optimizer':>9} "
          f"{'activations':>11} {'logits':>7} | {'total GiB':>9}")
    for l in layouts[: args.show]:
        print(f"{l.tp:>3} {l.pp:>3} {l.cp:>3} {l.dp:>4} | {l.params_gib:>13.2f} {l.optimizer_gib:>9.2f} "
              f"{l.activations_gib:>11.2f} {l.logits_gib:>7.2f} | {l.total_gib:>9.2f}")
    best = layouts[0]
    print(f"suggested: --tensor-model-parallel-size {best.tp} --pipeline-model-parallel-size {best.pp} "
          f"--context-parallel-size {best.cp} --use-distributed-optimizer"
          + (" --sequence-parallel" if best.tp > 1 else "")
          + "".join(f" --recompute-{k} {v}" for k, v in zip(("granularity", "method", "num-layers"),
                                                            recompute) if v is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
