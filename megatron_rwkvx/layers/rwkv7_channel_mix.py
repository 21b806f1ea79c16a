"""RWKV-7 ChannelMix (the feed-forward of every block, RWKV and sparse-attention alike).

``k = x + (x[t-1] - x[t]) * x_k``; ``out = W_v relu(W_k k)^2``. The key projection is
column-parallel, the value projection row-parallel; ``x_k`` acts on the full input and is replicated.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.layers import rwkv7_init
from megatron_rwkvx.layers.tensor_parallel_utils import (
    ProjectionSubmodules,
    build_column_projection,
    build_row_projection,
    gather_mixer_input,
    previous_token_across_ranks,
    replicated_param,
)
from megatron_rwkvx.layers.token_shift import token_shift_delta


class RWKV7ChannelMix(MegatronModule):
    """``forward(hidden_states [S, B, C]) -> (out [S, B, C], bias)``."""

    def __init__(
        self,
        config: RWKVXConfig,
        submodules: ProjectionSubmodules,
        layer_number: int,
        rwkv_index: Optional[int] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config)
        layer_index = layer_number - 1
        if rwkv_index is None:
            # Sparse blocks take the init of the RWKV block just before them.
            rwkv_index = max(config.layer_pattern[: layer_index + 1].count("R") - 1, 0)
        c = config.hidden_size
        x_k = rwkv7_init.channel_mix_vector(c, rwkv_index, max(config.num_rwkv_layers, 1))
        self.x_k = torch.nn.Parameter(x_k.to(config.params_dtype))
        self.key = build_column_projection(
            submodules, config, c, config.ffn_hidden_size, rwkv7_init.uniform_init(0.5)
        )
        self.value = build_row_projection(
            submodules, config, config.ffn_hidden_size, c, rwkv7_init.zero_init
        )

    def forward(self, hidden_states: torch.Tensor, previous_token: Optional[torch.Tensor] = None):
        x = gather_mixer_input(hidden_states, self.config.sequence_parallel)
        xx = token_shift_delta(x, previous_token_across_ranks(x, previous_token))
        k = x + xx * replicated_param(self.x_k)
        hidden = torch.relu(self.key(k)[0]) ** 2
        return self.value(hidden)
