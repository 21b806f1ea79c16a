#!/usr/bin/env python
"""Passkey retrieval over context lengths x needle depths: a results table and a heatmap PNG.

  python tools/eval_passkey.py --model rwkvx.pth --lengths 1024,4096,16384 --depths 10 --seeds 5 \
      --output-dir results/passkey

Prompts are the reference protocol (docs/design.md section 6); each (length, depth, seed) is decoded
greedily with exact incremental inference and scored by exact match of the first number. Writes
``passkey.json`` (every record; with --hit-rate each also says whether the sparse layers selected
a chunk holding the key; with --read-weight, how much weight the answer's digits put on the same
digits in the needle), ``passkey.md`` (the tables) and ``passkey.png`` (context length x depth, red 0%
to green 100%).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from megatron_rwkvx.evaluation.cli import (add_model_args, engine_from_args, parse_lengths, tokenizer_from_args,
                                              write_report)

    add_model_args(p)
    p.add_argument("--lengths", required=True, help="comma-separated prompt lengths in tokens")
    p.add_argument("--depths", type=int, default=10, help="number of needle depths from 0%% to 100%%")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--piece-size", type=int, default=4096, help="prefill tokens per call")
    p.add_argument("--hit-rate", action="store_true",
                   help="also record, per prompt, whether the sparse layers select a chunk holding the key")
    p.add_argument("--read-weight", action="store_true",
                   help="also run each prompt with its right answer appended and record, per sparse layer, the "
                        "attention weight each answer digit puts on that digit in the needle (a second prefill "
                        "per prompt)")
    p.add_argument("--output-dir", required=True)
    args = p.parse_args(argv)
    lengths = parse_lengths(p, args.lengths)

    from megatron_rwkvx.evaluation.passkey import depth_grid, format_table, heatmap_png, run_passkey

    engine = engine_from_args(args)
    tokenizer = tokenizer_from_args(args)
    if getattr(tokenizer, "vocab_size", 0) > engine.vocab_size:
        print(f"note: tokenizer has {tokenizer.vocab_size} ids, the model {engine.vocab_size}", file=sys.stderr)
    os.makedirs(args.output_dir, exist_ok=True)

    def progress(rec):
        mark = "ok " if rec["correct"] else "MISS"
        print(f"{mark} len={rec['length']} depth={rec['depth']:.2f} seed={rec['seed']} "
              f"key={rec['answer']} got={rec['generated']!r}", file=sys.stderr, flush=True)

    records = run_passkey(engine, tokenizer, lengths, depth_grid(args.depths), args.seeds,
                          args.max_new_tokens, args.piece_size, progress=progress, hit_rate=args.hit_rate,
                          read_weight=args.read_weight)
    write_report(args.output_dir, "passkey", records,
                 f"Passkey accuracy ({args.model}, {args.seeds} seeds per cell)", format_table(records), heatmap_png)
    overall = sum(r["correct"] for r in records) / len(records)
    hits = [r["hit"] for r in records if r.get("hits")]
    hit_note = f"; selection hit rate {sum(hits) / len(hits):.1%}" if hits else ""
    read = [max(r["read_weight"]) for r in records if r.get("read_weight")]
    read_note = f"; read weight (largest layer) {sum(read) / len(read):.3f}" if read else ""
    print(f"overall accuracy {overall:.1%} over {len(records)} prompts{hit_note}{read_note}; "
          f"wrote {args.output_dir}/passkey.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
