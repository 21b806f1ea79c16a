"""Argument checks shared by every backend, so bad input fails the same way everywhere."""
from __future__ import annotations

import math
from typing import Optional

import torch


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int,
    top_k: int,
    scale: Optional[float],
    q_offset: int,
) -> float:
    """Validate the call and return the softmax scale to use."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims [batch, time, heads, head_dim], got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, tq, hq, d = q.shape
    _, tk, hkv, dk = k.shape
    if k.shape[0] != b:
        raise ValueError(f"batch sizes differ: q has {b}, k/v have {k.shape[0]}")
    if dk != d:
        raise ValueError(f"head_dim differs: q has {d}, k/v have {dk}; project q, k, v to one head size")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a positive multiple of kv heads ({hkv}) for grouped-query "
            "attention; choose num_query_groups dividing num_attention_heads"
        )
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1 (the own chunk counts as one), got {top_k!r}")
    if not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset must be an int >= 0, got {q_offset!r}")
    if tk < q_offset + tq:
        raise ValueError(
            f"keys cover positions 0..{tk - 1} but the queries reach position {q_offset + tq - 1} "
            f"(q_offset={q_offset}, Tq={tq}); pass k/v for every position up to the last query "
            "(Tk >= q_offset + Tq)"
        )
    if scale is None:
        return 1.0 / math.sqrt(d)
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return scale
