"""Entry point: ``python -m megatron_rwkvx.pretrain [args]`` (one process per GPU, or per CPU rank).

Launch with torchrun (``torchrun --nproc-per-node 8 -m megatron_rwkvx.pretrain ...``) or srun with
one task per GPU; see ``examples/train_stage1.sh`` and ``examples/train_stage2.sh``.
"""
from __future__ import annotations

import os
import sys


def main(argv=None) -> int:
    from megatron_rwkvx.training.arguments import ArgumentError, parse_args

    try:
        args = parse_args(argv)
    except ArgumentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from megatron_rwkvx.training.loop import pretrain

    try:
        return pretrain(args)
    except ArgumentError as err:
        # Model/data checks that need the tokenizer or the checkpoint: still before any training.
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
