#!/usr/bin/env python
"""Copy of random strings by string length: where the recurrent state stops holding the string, and
whether the sparse blocks copy instead (their weight on the token to copy next).

  python tools/eval_copy.py --model rwkvx.pth --tokenizer-type ByteTokenizer --context 1024 \
      --string-lengths 10,20,40,80,160,320 --seeds 3 --output-dir results/copy

Documents are ``megatron_rwkvx.data.retrieval_tasks.copy_document`` lines ``Copy: <s>. Again: <s>.``
with every string of one length and evaluation seeds 0..seeds-1, scored teacher-forced on the second
copy (``megatron_rwkvx.evaluation.copy_probe``). Writes ``copy.json``, ``copy.md`` (loss, accuracy and
induction weight by string length) and ``copy.png`` (accuracy by string length).
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from megatron_rwkvx.evaluation.cli import (add_model_args, engine_from_args, parse_lengths, tokenizer_from_args,
                                              write_report)

    add_model_args(p)
    p.add_argument("--context", type=int, default=1024, help="document length in tokens")
    p.add_argument("--string-lengths", required=True, help="comma-separated string lengths in characters")
    p.add_argument("--seeds", type=int, default=3, help="documents per string length (evaluation seeds 0..N-1)")
    p.add_argument("--output-dir", required=True)
    args = p.parse_args(argv)
    lengths = parse_lengths(p, args.string_lengths)
    if args.seeds < 1 or args.context < 1:
        p.error("--seeds and --context must be >= 1")

    from megatron_rwkvx.evaluation.copy_probe import copy_png, format_copy_table, run_copy_probe

    engine = engine_from_args(args)
    tokenizer = tokenizer_from_args(args)
    try:
        records = run_copy_probe(engine, tokenizer, args.context, lengths, args.seeds)
    except ValueError as e:  # a string too long for the context
        print(f"error: {e}; use a longer --context or shorter --string-lengths", file=sys.stderr)
        return 2
    write_report(args.output_dir, "copy", records,
                 f"Copy by string length ({args.model}, context {args.context}, {args.seeds} documents per length)",
                 format_copy_table(records), copy_png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
