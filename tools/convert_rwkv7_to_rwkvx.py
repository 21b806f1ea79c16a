#!/usr/bin/env python
"""Expand a pretrained RWKV-7 checkpoint into an RWKV-X model by inserting sparse-attention blocks.

Examples:
  python tools/convert_rwkv7_to_rwkvx.py --input rwkv7-0.1b.pth --output rwkvx-0.2b.pth \\
      --num-sparse-blocks 4                       # RRRA x 4, zero-init (identity) blocks
  python tools/convert_rwkv7_to_rwkvx.py --input base.pth --output ckpt_dir \\
      --pattern RRRARRRARRRARRRA --init copy --output-format megatron
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", required=True, help="RWKV-7 .pth in the official key layout")
    p.add_argument("--output", required=True, help=".pth file (pth) or directory (megatron)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--pattern", help="layer pattern, e.g. RRRARRRA (R kept in order)")
    group.add_argument(
        "--num-sparse-blocks",
        type=int,
        help="insert N sparse blocks, one after every n_rwkv/N RWKV blocks (the reference)",
    )
    p.add_argument("--init", choices=("zero", "copy"), default="zero",
                   help="zero: new blocks are the identity (default); copy: copy the RWKV block before")
    p.add_argument("--output-format", choices=("pth", "megatron"), default="pth",
                   help="pth: one file in the RWKV-X reference layout; megatron: a dist_checkpointing "
                        "directory the trainer loads with any tensor/pipeline layout")
    p.add_argument("--sparse-chunk-size", type=int, default=2048)
    p.add_argument("--sparse-top-k", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="seed of the new blocks' random weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_rwkvx.checkpointing.expansion import expand_rwkv7_state_dict
    from megatron_rwkvx.checkpointing.official_format import load_state_dict_file

    if os.path.exists(args.output) and not args.overwrite:
        print(f"error: {args.output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    base = load_state_dict_file(args.input)
    expanded, pattern = expand_rwkv7_state_dict(
        base, args.pattern, args.num_sparse_blocks, args.init, args.seed
    )
    if args.output_format == "pth":
        tmp = args.output + ".partial"
        torch.save(expanded, tmp)
        os.replace(tmp, args.output)  # never leave a half-written file under the final name
    else:
        from megatron_rwkvx.checkpointing.megatron_format import save_pretrained_as_megatron

        save_pretrained_as_megatron(
            expanded,
            args.output,
            sparse_chunk_size=args.sparse_chunk_size,
            sparse_top_k=args.sparse_top_k,
        )
    print(json.dumps({"output": args.output, "pattern": pattern, "init": args.init,
                      "format": args.output_format}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
