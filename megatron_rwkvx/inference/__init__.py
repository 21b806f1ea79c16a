"""Incremental inference: per-layer states, the exact prefill/decode engine, sampling, generation."""
from megatron_rwkvx.inference.attention_cache import ChunkedKVCache
from megatron_rwkvx.inference.engine import InferenceEngine
from megatron_rwkvx.inference.state import (
    AttentionLayerState,
    InferenceState,
    RWKVLayerState,
    new_state,
)

__all__ = [
    "AttentionLayerState",
    "ChunkedKVCache",
    "InferenceEngine",
    "InferenceState",
    "RWKVLayerState",
    "new_state",
]
