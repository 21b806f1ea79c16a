#!/usr/bin/env python
"""Make a small corpus on this machine, with nothing downloaded.

Writes into --output:
  text.jsonl     one {"text": ...} object per line: documentation strings of Python standard-library
                 modules, classes and functions (real English prose with code), in a fixed order.
  passkey.jsonl  (only with --passkey-lengths) synthetic passkey-retrieval documents, one object per
                 line with keys text (prompt + answer), prompt, answer (the 5-digit key),
                 length_tokens (prompt length in RWKV World tokens), target_length, depth (0..1), seed.
                 --passkey-depths depths x --passkey-seeds seeds documents per length.

Then: python tools/preprocess_data.py --input DIR/text.jsonl --output-prefix data/sample --append-eod
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="directory to write text.jsonl (and passkey.jsonl) into")
    p.add_argument("--num-docs", type=int, default=None, help="at most this many text documents (default: all, about 1000)")
    p.add_argument("--passkey-lengths", type=int, nargs="*", default=[],
                   help="prompt lengths in RWKV World tokens, e.g. 1024 4096 16384")
    p.add_argument("--passkey-depths", type=int, default=10, help="needle depths per length, spread over 0..1")
    p.add_argument("--passkey-seeds", type=int, default=5, help="keys per length and depth")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --output")
    args = p.parse_args(argv)
    if args.num_docs is not None and args.num_docs < 1:
        p.error("--num-docs must be at least 1")
    if any(n < 1 for n in args.passkey_lengths) or args.passkey_depths < 1 or args.passkey_seeds < 1:
        p.error("--passkey-lengths, --passkey-depths and --passkey-seeds must be positive")
    from megatron_rwkvx.data.sample_corpus import write_corpus

    try:
        paths = write_corpus(args.output, args.num_docs, args.passkey_lengths, args.passkey_depths,
                             args.passkey_seeds, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"make_sample_corpus.py: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
