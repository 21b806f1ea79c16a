"""Command-line pieces shared by the inference and evaluation tools: model and tokenizer options."""
from __future__ import annotations

import argparse
import sys
from typing import Dict

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a .pth file or a training checkpoint directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override (repeatable). A .pth takes the fields it does not store, e.g. "
                        "sparse_chunk_size=64 or layer_pattern=RRARRA; a checkpoint directory keeps its "
                        "model_config.json's architecture and takes the others, e.g. "
                        "sparse_attention_backend=reference or sparse_selection=quest")
    p.add_argument("--max-cached-chunks", type=int, default=None,
                   help="cap on cached chunks per attention layer (evicts the least selected); default none")
    p.add_argument("--tokenizer-type", default="RWKVWorldTokenizer")
    p.add_argument("--tokenizer-model", default=None)


def parse_lengths(p: argparse.ArgumentParser, text: str):
    """``--lengths 1024,4096`` as a list of positive ints (``p.error`` otherwise)."""
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"--lengths must be comma-separated integers, got {text!r}")
    if not lengths or min(lengths) < 1:
        p.error("--lengths needs at least one positive length")
    return lengths


def parse_number(value: str):
    """``value`` as an int, else a float, else the string itself (FIELD=VALUE overrides)."""
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    return value


def parse_overrides(items) -> Dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"error: --set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_number(value)
    return out


def engine_from_args(args):
    import torch

    from megatron_rwkvx.inference import InferenceEngine
    from megatron_rwkvx.inference.loading import load_model

    from megatron_rwkvx.errors import INPUT_ERRORS

    dtype = getattr(torch, DTYPES[args.dtype])
    try:
        model = load_model(args.model, device=args.device, dtype=dtype, **parse_overrides(args.set))
        return InferenceEngine(model, max_cached_chunks=args.max_cached_chunks)
    except INPUT_ERRORS as err:  # the tools' one-line refusal (errors.py), not a traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def tokenizer_from_args(args):
    from megatron_rwkvx.data.tokenizers import build_tokenizer

    return build_tokenizer(args.tokenizer_type, args.tokenizer_model)


def write_report(output_dir: str, stem: str, rows, title: str, table: str, draw_png) -> None:
    """``<stem>.json`` (the rows), ``<stem>.md`` (title and table) and ``<stem>.png`` (``draw_png(rows,
    path)``) in ``output_dir``; then the table on stdout."""
    import json
    import os

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{stem}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(output_dir, f"{stem}.md"), "w") as f:
        f.write(f"{title}\n\n{table}\n")
    draw_png(rows, os.path.join(output_dir, f"{stem}.png"))
    print(table)
