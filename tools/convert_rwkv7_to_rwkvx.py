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
    p.add_argument("--attention-mode", choices=("sparse", "dense"), default="sparse",
                   help="what the new A blocks compute (recorded in the megatron checkpoint): dense "
                        "starts the dense-attention baseline from the same weights")
    p.add_argument("--sparse-token-shift", action="store_true",
                   help="give the new blocks token-shift mixes on their query/key/value inputs (not in "
                        "the reference RWKV-X; see docs/retrieval_study.md, finding 13): 0.5 per "
                        "channel, or the RWKV block's x_r/x_k/x_v with --init copy")
    p.add_argument("--seed", type=int, default=0, help="seed of the new blocks' random weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


def _check_input(args, base) -> None:
    """Refuse a file that is not an RWKV-7 checkpoint to expand (raises CheckpointFormatError);
    the block counts are checked by the expansion itself."""
    from megatron_rwkvx.checkpointing.official_format import (
        CheckpointFormatError,
        config_kwargs_from_state_dict,
    )

    if any(k.startswith(("rwkv.", "moba.")) for k in base):
        raise CheckpointFormatError(
            f"--input {args.input} is already an RWKV-X checkpoint (it has rwkv./moba. keys), so there "
            "is nothing to expand: use it as it is (pretrain --init-from, tools/generate.py --model), "
            "or convert the RWKV-7 file it was made from"
        )
    try:
        config_kwargs_from_state_dict(base)
    except CheckpointFormatError as err:
        raise CheckpointFormatError(
            f"--input {args.input}: {err}. The converter expands an RWKV-7 (x070) checkpoint in the "
            "official key layout (emb.weight, blocks.N.att.r_k, ..., head.weight)"
        ) from err


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_rwkvx.checkpointing.expansion import expand_rwkv7_state_dict
    from megatron_rwkvx.checkpointing.official_format import load_state_dict_file
    from megatron_rwkvx.errors import INPUT_ERRORS

    def fail(message) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    if os.path.exists(args.output) and not args.overwrite:
        return fail(f"{args.output} exists; pass --overwrite to replace it")
    if os.path.isdir(args.input):
        return fail(f"--input {args.input} is a directory; give the RWKV-7 .pth file to expand (a "
                    "training checkpoint directory becomes a .pth with tools/export_checkpoint.py)")
    if not os.path.isfile(args.input):
        return fail(f"--input {args.input} does not exist; give the RWKV-7 .pth file to expand")
    if args.attention_mode != "sparse" and args.output_format == "pth":
        return fail(f"--attention-mode {args.attention_mode} is recorded only by --output-format "
                    "megatron (a reference-layout .pth is read as sparse): add --output-format megatron")
    parent = os.path.dirname(os.path.abspath(args.output))
    if args.output_format == "pth" and not os.path.isdir(parent):
        return fail(f"the folder of --output {args.output} does not exist; create {parent} first")
    try:
        base = load_state_dict_file(args.input)
        _check_input(args, base)
        expanded, pattern = expand_rwkv7_state_dict(
            base, args.pattern, args.num_sparse_blocks, args.init, args.seed, args.sparse_token_shift
        )
        if args.output_format == "pth":
            tmp = args.output + ".partial"
            torch.save(expanded, tmp)
            os.replace(tmp, args.output)  # never leave a half-written file under the final name
        else:
            from megatron_rwkvx.pretrained import save_pretrained_as_megatron

            save_pretrained_as_megatron(
                expanded,
                args.output,
                sparse_chunk_size=args.sparse_chunk_size,
                sparse_top_k=args.sparse_top_k,
                attention_mode=args.attention_mode,
            )
    except INPUT_ERRORS as err:
        return fail(err)
    print(json.dumps({"output": args.output, "pattern": pattern, "init": args.init,
                      "format": args.output_format}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
