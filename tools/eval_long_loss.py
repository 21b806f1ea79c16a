#!/usr/bin/env python
"""Loss by position bucket on long documents: a table and a line plot (PNG).

  python tools/eval_long_loss.py --model rwkvx.pth --input pg19_test.jsonl --max-length 65536 \
      --max-docs 20 --output-dir results/long_loss

``--input``: a ``.jsonl`` file (one document per line, text under ``--field``) or a plain text file
(one document). Each document is cut at ``--max-length`` tokens and scored exactly with the
incremental engine, ``--piece-size`` tokens per call. Buckets double from ``--first-bucket``
(0-128, 128-256, 256-512, ...) unless ``--bucket-size`` asks for equal ones.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from megatron_rwkvx.evaluation.cli import add_model_args, engine_from_args, tokenizer_from_args, write_report

    add_model_args(p)
    p.add_argument("--input", required=True)
    p.add_argument("--field", default="text")
    p.add_argument("--max-length", type=int, default=65536)
    p.add_argument("--min-length", type=int, default=2, help="skip documents with fewer tokens")
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--first-bucket", type=int, default=128)
    p.add_argument("--bucket-size", type=int, default=None)
    p.add_argument("--piece-size", type=int, default=4096)
    p.add_argument("--output-dir", required=True)
    args = p.parse_args(argv)
    if not os.path.isfile(args.input):
        p.error(f"--input {args.input} does not exist")
    if args.min_length < 2:
        p.error("--min-length must be >= 2 (a loss needs a next token)")

    from megatron_rwkvx.evaluation.long_loss import (
        bucket_edges, format_table, losses_by_position, plot_png, read_documents, token_losses,
    )

    tokenizer = tokenizer_from_args(args)
    engine = engine_from_args(args)
    losses = []
    for text in read_documents(args.input, args.field):
        if args.max_docs is not None and len(losses) >= args.max_docs:
            break
        ids = tokenizer.tokenize(text)[: args.max_length]
        if len(ids) < args.min_length:
            continue
        losses.append(token_losses(engine, ids, args.piece_size))
        print(f"document {len(losses)}: {len(ids)} tokens, mean loss {float(losses[-1].mean()):.4f}",
              file=sys.stderr, flush=True)
    if not losses:
        print(f"error: no document in {args.input} has {args.min_length}+ tokens", file=sys.stderr)
        return 2
    longest = max(int(l.numel()) + 1 for l in losses)
    rows = losses_by_position(losses, bucket_edges(longest, args.first_bucket, args.bucket_size))
    write_report(args.output_dir, "long_loss", rows,
                 f"Loss by position ({args.model}, {len(losses)} documents)", format_table(rows), plot_png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
