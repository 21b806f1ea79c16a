#!/usr/bin/env python
"""Multi-query associative recall (MQAR) over context lengths: accuracy and chunk-selection hit rate.

  python tools/eval_mqar.py --model rwkvx.pth --tokenizer-type ByteTokenizer --lengths 512,2048,8192 \
      --num-pairs 64 --num-queries 32 --seeds 5 --output-dir results/mqar

Documents are ``megatron_rwkvx.data.retrieval_tasks.mqar_document`` (pairs first, filler, then the
queries) with evaluation seeds 0..seeds-1 (training corpora use other seeds). Each document is fed
with exact incremental inference; a query is correct when greedy decoding writes its whole value
(``megatron_rwkvx.evaluation.retrieval``). Writes ``mqar.json`` (every query, with per-layer
selection hits), ``mqar.md`` (accuracy and hit rate by length) and ``mqar.png`` (accuracy by length).
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
    p.add_argument("--lengths", required=True, help="comma-separated document lengths in tokens")
    p.add_argument("--num-pairs", type=int, required=True, help="key-value pairs per document")
    p.add_argument("--num-queries", type=int, required=True, help="pairs asked again at the end")
    p.add_argument("--key-letters", type=int, choices=(1, 2), default=2,
                   help="letters per key: 2 (lowercase, up to 676 pairs) or 1 (one character from --key-alphabet: "
                        "the retrieval study's curriculum)")
    p.add_argument("--key-alphabet", choices=("letters", "symbols"), default="letters",
                   help="one-letter keys' alphabet: letters (52) or symbols (144: the letters, ASCII punctuation "
                        "and Latin-1 letters; each key ends in a byte of its own)")
    p.add_argument("--seeds", type=int, default=5, help="documents per length (evaluation seeds 0..N-1)")
    p.add_argument("--piece-size", type=int, default=4096, help="prefill tokens per call")
    p.add_argument("--output-dir", required=True)
    args = p.parse_args(argv)
    lengths = parse_lengths(p, args.lengths)
    if args.seeds < 1 or not 1 <= args.num_queries <= args.num_pairs:
        p.error("--seeds must be >= 1 and --num-queries in 1..--num-pairs")
    if args.key_alphabet != "letters" and args.key_letters != 1:
        p.error("--key-alphabet symbols needs --key-letters 1")

    from megatron_rwkvx.evaluation.retrieval import accuracy_png, format_table, run_mqar

    engine = engine_from_args(args)
    tokenizer = tokenizer_from_args(args)
    os.makedirs(args.output_dir, exist_ok=True)

    try:
        records = run_mqar(engine, tokenizer, lengths, args.num_pairs, args.num_queries, args.seeds, args.piece_size,
                           key_letters=args.key_letters, alphabet=args.key_alphabet)
    except ValueError as e:  # a length too short for the pairs and queries, too many one-letter keys
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_report(args.output_dir, "mqar", records,
                 f"MQAR accuracy ({args.model}, {args.num_pairs} pairs of {args.key_letters}-letter keys"
                 f"{'' if args.key_alphabet == 'letters' else ' (' + args.key_alphabet + ')'}, "
                 f"{args.num_queries} queries, "
                 f"{args.seeds} documents per length)", format_table(records), accuracy_png)
    overall = sum(r["correct"] for r in records) / len(records)
    print(f"overall accuracy {overall:.1%} over {len(records)} queries; wrote {args.output_dir}/mqar.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
