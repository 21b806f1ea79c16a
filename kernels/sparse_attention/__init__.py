"""Top-k chunk sparse attention of RWKV-X (MoBA semantics): one interface, several backends.

``topk_chunk_attention`` is the operator; ``chunk_mean_keys``, ``chunk_selection_keys``,
``selection_queries``, ``select_chunks``, ``best_chunk_slots`` and ``topk_chunk_selection`` expose
the chunk selection that every backend shares (``SELECTION_RULES``: ``mean``, ``quest``), for
inference and context parallelism; ``register_backend`` adds a backend to the registry
(``kernels/registry.py``); ``dense_causal_attention`` is the dense baseline (``dense.py``), not one of the operator's backends.
"""
from .dense import dense_causal_attention
from .dispatch import SPARSE_ATTENTION, available_backends, register_backend, topk_chunk_attention
from .selection import (
    MEAN_SELECTION,
    QUEST_SELECTION,
    SELECTION_RULES,
    best_chunk_slots,
    check_selection,
    chunk_mean_keys,
    chunk_selection_keys,
    select_chunks,
    selection_key_width,
    selection_queries,
    topk_chunk_selection,
)

__all__ = [
    "MEAN_SELECTION",
    "QUEST_SELECTION",
    "SELECTION_RULES",
    "SPARSE_ATTENTION",
    "available_backends",
    "best_chunk_slots",
    "check_selection",
    "chunk_mean_keys",
    "chunk_selection_keys",
    "dense_causal_attention",
    "register_backend",
    "select_chunks",
    "selection_key_width",
    "selection_queries",
    "topk_chunk_attention",
    "topk_chunk_selection",
]
