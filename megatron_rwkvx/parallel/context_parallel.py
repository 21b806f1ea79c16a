"""Context-parallel (CP) building blocks of RWKV-X, one import for the model layers.

The sequence is split contiguously over the CP ranks (rank r holds positions
``[r * T / cp, (r + 1) * T / cp)``); each function takes the CP process group (default:
megatron's ``parallel_state.get_context_parallel_group()``), is exact and is differentiable.
How they work and what they communicate: docs/parallelism.md, "Context parallelism".
"""
from .cp_comm import (
    all_gather_sum_grad,
    gather_from_context_parallel,
    previous_token_from_prev_rank,
    resolve_group,
    split_for_context_parallel,
)
from .cp_sparse_attention import check_context_parallel_chunking, topk_chunk_attention_context_parallel
from .cp_wkv7 import wkv7_context_parallel, wkv7_shard_summary

__all__ = [
    "all_gather_sum_grad",
    "check_context_parallel_chunking",
    "gather_from_context_parallel",
    "previous_token_from_prev_rank",
    "resolve_group",
    "split_for_context_parallel",
    "topk_chunk_attention_context_parallel",
    "wkv7_context_parallel",
    "wkv7_shard_summary",
]
