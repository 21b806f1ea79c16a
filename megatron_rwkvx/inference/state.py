"""What a model remembers between inference calls, per layer and per batch row.

``R`` layer: the time-mix shift token, the WKV state (fp32, [B, H, N, N]) and the channel-mix shift
token. ``A`` layer: the chunked key/value cache, the channel-mix shift token and the attention's
shift token (read only with ``sparse_token_shift``). Everything is
constant-size except the attention caches, which grow by one chunk every ``chunk_size`` tokens
unless capped (``max_chunks``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from megatron_rwkvx.config import DENSE_MODE
from megatron_rwkvx.errors import UsageError
from megatron_rwkvx.inference.attention_cache import ChunkedKVCache


@dataclass
class RWKVLayerState:
    time_shift: torch.Tensor  # [B, C]: the time-mix input of the last token
    wkv: torch.Tensor  # [B, H, N, N] fp32
    channel_shift: torch.Tensor  # [B, C]: the channel-mix input of the last token


@dataclass
class AttentionLayerState:
    cache: ChunkedKVCache
    channel_shift: torch.Tensor  # [B, C]
    time_shift: torch.Tensor  # [B, C]: the attention input of the last token (sparse_token_shift)


LayerState = Union[RWKVLayerState, AttentionLayerState]


@dataclass
class InferenceState:
    layers: List[LayerState]
    lengths: List[int]  # tokens consumed per row

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def memory_bytes(self) -> int:
        total = 0
        for st in self.layers:
            if isinstance(st, RWKVLayerState):
                tensors = (st.time_shift, st.wkv, st.channel_shift)
            else:
                total += st.cache.memory_bytes()
                tensors = (st.channel_shift, st.time_shift)
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total


def check_decodable(cfg) -> None:
    """Refuse a model whose function the incremental decoder does not compute."""
    if cfg.attention_mode == DENSE_MODE:
        raise UsageError(
            "the incremental decoder caches keys by chunk and attends to the selected chunks, as "
            "the sparse blocks do; this model's A blocks run attention_mode 'dense' (the timing "
            "baseline), which it cannot reproduce: decode and evaluate a model with attention_mode "
            "'sparse', or score this one with full forward passes (model(tokens))"
        )


def new_state(model, batch_size: int, max_cached_chunks: Optional[int] = None,
              device: Optional[torch.device] = None) -> InferenceState:
    """Empty state for ``batch_size`` sequences of ``model`` (an ``RWKVXModel``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = model.config
    check_decodable(cfg)
    param = next(model.parameters())
    device = device or param.device
    dtype = param.dtype
    c = cfg.hidden_size
    layers: List[LayerState] = []
    for layer in model.decoder.layers:
        shift = lambda: torch.zeros(batch_size, c, dtype=dtype, device=device)  # noqa: E731
        if layer.symbol == "R":
            heads, n = layer.mixer.local_heads, layer.mixer.head_size
            wkv = torch.zeros(batch_size, heads, n, n, dtype=torch.float32, device=device)
            layers.append(RWKVLayerState(shift(), wkv, shift()))
        elif layer.symbol == "A":
            mixer = layer.mixer
            cache = ChunkedKVCache(
                batch_size, mixer.local_kv_heads, mixer.head_size,
                chunk_size=cfg.sparse_chunk_size, top_k=cfg.sparse_top_k,
                dtype=dtype, device=device, max_chunks=max_cached_chunks,
                selection=cfg.sparse_selection,
            )
            layers.append(AttentionLayerState(cache, shift(), shift()))
        else:
            raise ValueError(f"layer symbol {layer.symbol!r} has no inference state; expected 'R' or 'A'")
    return InferenceState(layers, [0] * batch_size)
