"""The top-k chunk attention operator's backends (``kernels/registry.py``) and its entry point.

Roles: ``reference`` (dense, the definition; tests only), ``torch`` (chunked PyTorch, any
device) and ``triton`` (``triton_backend.py``, a plug-in that registers itself when imported).
A backend is called with validated tensors as ``fn(q, k, v, chunk_size=, top_k=,
scale=<float>, q_offset=, selection=)`` and must honour the selection of ``selection.py``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..registry import REFERENCE, TORCH, TRITON, Operator, Plugin
from .checks import check_inputs
from .chunked import topk_chunk_attention_torch
from .probe import probe_case
from .reference import topk_chunk_attention_reference
from .selection import MEAN_SELECTION, check_selection

SPARSE_ATTENTION = Operator(
    "sparse-attention",
    plugins=[Plugin(TRITON, f"{__package__}.triton_backend")],
    probe=probe_case,
)


# The operator's public registry functions (the plug-in modules and tests use these).
register_backend = SPARSE_ATTENTION.register
available_backends = SPARSE_ATTENTION.available


def topk_chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int = 2048,
    top_k: int = 3,
    scale: Optional[float] = None,
    q_offset: int = 0,
    backend: str = "auto",
    selection: str = MEAN_SELECTION,
) -> torch.Tensor:
    """Top-k chunk sparse attention (RWKV-X / MoBA semantics).

    q ``[B, Tq, Hq, D]`` holds positions ``q_offset .. q_offset + Tq - 1``; k, v ``[B, Tk, Hkv, D]``
    hold positions ``0 .. Tk - 1`` with ``Tk >= q_offset + Tq`` (later keys are ignored);
    ``Hq % Hkv == 0`` and query head h uses kv head ``h // (Hq // Hkv)``. Each query attends
    causally to its own chunk of ``chunk_size`` keys and fully to the ``top_k - 1`` complete past
    chunks whose mean key scores highest against it (no gradient through this choice), with one
    softmax of scale ``scale`` (default ``1/sqrt(D)``). Returns ``[B, Tq, Hq, D]`` in q's dtype.
    ``selection``: how a past chunk is scored, ``mean`` (its mean key: the reference's rule) or
    ``quest`` (the largest score one of its keys can reach, Quest's bound; see ``selection.py``).
    ``backend``: ``auto`` (the fastest exact backend for the device and dtype; ``torch`` on the
    CPU), ``torch``, ``reference`` or ``triton``.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    scale = check_inputs(q, k, v, chunk_size=chunk_size, top_k=top_k, scale=scale, q_offset=q_offset)
    check_selection(selection)
    fn = SPARSE_ATTENTION.resolve(
        backend, q,
        dict(chunk_size=chunk_size, top_k=top_k, scale=scale, kv_heads=k.shape[2], selection=selection),
    )
    if q.shape[1] == 0:
        return q.new_empty(q.shape)
    return fn(q, k, v, chunk_size=chunk_size, top_k=top_k, scale=scale, q_offset=q_offset,
              selection=selection)


SPARSE_ATTENTION.register(REFERENCE, topk_chunk_attention_reference, auto=lambda q: False)
SPARSE_ATTENTION.register(TORCH, topk_chunk_attention_torch)
