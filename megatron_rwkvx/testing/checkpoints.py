"""Random checkpoints in the official file layouts, for tests and benchmarks (no download)."""
from __future__ import annotations

from typing import Dict

import torch

from megatron_rwkvx.checkpointing.official_format import (
    OFFICIAL_RWKV7,
    KeyLayout,
    checkpoint_entries,
    to_file_layout,
)
from megatron_rwkvx.config import RWKVXConfig


def random_official_state_dict(
    cfg: RWKVXConfig, seed: int = 0, layout: KeyLayout = OFFICIAL_RWKV7
) -> Dict[str, torch.Tensor]:
    """A state dict in the file layout with values in the ranges a trained model has, so that
    every term of the math (decay, in-context rate, value residual, gates, bonus) is exercised."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    out = {}
    for e in checkpoint_entries(cfg, layout):
        shape = e.full_shape
        key = e.model_key
        if key.endswith(("norm.weight", "ln0.weight")) or key.endswith("final_norm.weight"):
            t = 1.0 + randn(*shape, scale=0.1)
        elif key.endswith(("norm.bias", "ln0.bias")) or key.endswith("final_norm.bias"):
            t = randn(*shape, scale=0.1)
        elif key.split(".")[-1].startswith("x_"):
            t = torch.rand(*shape, generator=g)
        elif key.endswith("ln_x_weight"):
            t = 0.5 + randn(*shape, scale=0.1)
        elif len(shape) == 2 and "embedding" in key:
            t = randn(*shape, scale=0.5)
        elif len(shape) == 2 and not key.endswith("r_k"):
            t = randn(*shape, scale=1.0 / shape[1] ** 0.5)
        else:  # w0, a0, v0, k_k, k_a, r_k, ln_x_bias
            t = randn(*shape, scale=0.5)
        out[e.file_key] = to_file_layout(e.kind, t).contiguous()
    return out
