#!/usr/bin/env python
"""Export a megatron-rwkvx checkpoint directory (any tensor/pipeline layout it was saved with) to a
single .pth in the official RWKV-7 layout (pure R models) or the RWKV-X reference layout, plus
``<output>.json`` with what the tensors cannot tell (layer pattern, grouped-query heads, sparse
chunk size and top-k, attention mode), which ``load_pretrained`` and the inference tools read back.

  python tools/export_checkpoint.py --load checkpoints/stage2 --output rwkvx.pth [--dtype bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (with model_config.json)")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest completed save")
    p.add_argument("--output", required=True)
    p.add_argument("--format", choices=("auto", "rwkv7", "rwkvx"), default="auto",
                   help="auto: rwkv7 when the pattern has no A blocks, else rwkvx")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if os.path.exists(args.output) and not args.overwrite:
        print(f"error: {args.output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2

    import torch

    from megatron_rwkvx.checkpointing.megatron_format import (
        architecture_of,
        load_model_checkpoint,
        read_model_config,
    )
    from megatron_rwkvx.checkpointing.official_format import (
        OFFICIAL_RWKV7,
        REFERENCE_RWKVX,
        export_state_dict,
    )
    from megatron_rwkvx.config import RWKVXConfig
    from megatron_rwkvx.models.rwkvx_model import RWKVXModel
    from megatron_rwkvx.pretrained import prepare_runtime, write_file_config

    prepare_runtime(torch.device("cpu"))
    arch = read_model_config(args.load)
    cfg = RWKVXConfig(use_cpu_initialization=True, **arch)
    model = RWKVXModel(cfg)
    iteration = load_model_checkpoint(model, cfg, args.load, args.iteration)
    fmt = args.format
    if fmt == "auto":
        fmt = "rwkvx" if "A" in cfg.layer_pattern else "rwkv7"
    if fmt == "rwkv7" and "A" in cfg.layer_pattern:
        print("error: the model has sparse-attention blocks; the RWKV-7 layout cannot hold them "
              "(use --format rwkvx)", file=sys.stderr)
        return 2
    layout = REFERENCE_RWKVX if fmt == "rwkvx" else OFFICIAL_RWKV7
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    sd = export_state_dict(model, cfg, layout, dtype=dtype)
    tmp = args.output + ".partial"
    torch.save(sd, tmp)
    os.replace(tmp, args.output)
    # The .pth layout holds tensors only: the pattern, GQA heads, chunk size, top-k and mode go beside it.
    config_path = write_file_config(args.output, architecture_of(cfg))
    print(json.dumps({"output": args.output, "config": config_path, "iteration": iteration,
                      "format": fmt, "pattern": cfg.layer_pattern}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
