"""Dense causal attention through torch's ``scaled_dot_product_attention``: the baseline a
sparse-attention block runs with ``attention_mode="dense"`` (config), and what the top-k chunk
operator equals when ``T <= chunk_size * top_k``.

Not a backend of the top-k operator (``dispatch.py``): it computes another function once the
sequence outgrows ``chunk_size * top_k``, so ``auto`` must never meet it.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# On a GPU in half precision the baseline is the flash kernel, or an error: a silent fall-back to
# the T x T math path would time (and size) something else.
_HALF = (torch.bfloat16, torch.float16)


def uses_flash(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the baseline runs (only) SDPA's flash kernel on this device and dtype."""
    return device.type == "cuda" and dtype in _HALF


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                           scale: Optional[float] = None, **unused) -> torch.Tensor:
    """Causal softmax attention on ``[B, T, H, D]`` tensors (k, v may have fewer heads: query head
    h uses kv head ``h // (Hq // Hkv)``), scale ``1/sqrt(D)`` by default; returns ``[B, T, Hq, D]``.
    Keyword options of the top-k operator (``chunk_size``, ``top_k``) are accepted and ignored."""
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"dense causal attention needs as many keys as queries, got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = qt.shape[1] != kt.shape[1]
    only_flash = sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if uses_flash(q.device, q.dtype) else contextlib.nullcontext()
    with only_flash:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)
