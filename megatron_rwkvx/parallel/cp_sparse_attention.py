"""Context parallelism for top-k chunk sparse attention: all-gather K/V, attend with an offset.

Exact: each rank runs the operator for its queries (positions ``rank * S_local ..``) over the keys
of every position up to its own last one, so the chunk selection and the softmax are those of the
unsharded run. Shards start on chunk boundaries so that no chunk straddles two ranks (each rank's
queries then begin a new chunk, as in the unsharded run's chunk grid).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_rwkvx.kernels.sparse_attention import MEAN_SELECTION, topk_chunk_attention

from .cp_comm import all_gather_sum_grad, resolve_group


def check_context_parallel_chunking(local_length: int, cp_size: int, chunk_size: int) -> None:
    """Raise a ValueError unless a shard of ``local_length`` tokens is a whole number of chunks."""
    if local_length % chunk_size:
        total = local_length * cp_size
        raise ValueError(
            f"sparse attention with context parallelism needs shard boundaries on chunk "
            f"boundaries: sequence length {total} split over context-parallel size {cp_size} gives "
            f"{local_length} tokens per rank, not a multiple of the sparse chunk size {chunk_size}; "
            f"use a sequence length that is a multiple of cp * chunk_size = {cp_size * chunk_size}, "
            "or a smaller context-parallel size or chunk size"
        )


def topk_chunk_attention_context_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int,
    top_k: int,
    scale: Optional[float] = None,
    group: Optional[dist.ProcessGroup] = None,
    backend: str = "auto",
    selection: str = MEAN_SELECTION,
) -> torch.Tensor:
    """``topk_chunk_attention`` for a sequence split contiguously across the CP ranks.

    q ``[B, S_local, Hq, D]`` and k, v ``[B, S_local, Hkv, D]`` are this rank's shard (the same
    S_local on every rank, a multiple of ``chunk_size``). Returns this rank's output
    ``[B, S_local, Hq, D]``, equal to the matching rows of the unsharded operator; the gradients
    of every rank's q, k, v equal the unsharded run's. Communication: an all_gather of K and V
    (``2 * cp * B * S_local * Hkv * D`` values) and, in the backward, an all_reduce of the same
    size. Every rank of ``group`` must call it.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dim tensor [B, S_local, H, D]")
    if k.shape != v.shape or k.shape[1] != q.shape[1]:
        raise ValueError(
            f"q, k, v must hold the same shard of the sequence and k, v one shape; got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    group = resolve_group(group)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    local = q.shape[1]
    if size == 1:
        return topk_chunk_attention(
            q, k, v, chunk_size=chunk_size, top_k=top_k, scale=scale, backend=backend,
            selection=selection,
        )
    check_context_parallel_chunking(local, size, chunk_size)
    # One collective for K and V together; later ranks' keys are gathered too (all_gather has no
    # ragged form) and simply not passed on.
    kv = all_gather_sum_grad(torch.cat([k, v], dim=-1), dim=1, group=group)
    kv = kv[:, : (rank + 1) * local]
    k_all, v_all = kv.split(k.shape[-1], dim=-1)
    return topk_chunk_attention(
        q, k_all, v_all, chunk_size=chunk_size, top_k=top_k, scale=scale,
        q_offset=rank * local, backend=backend, selection=selection,
    )
