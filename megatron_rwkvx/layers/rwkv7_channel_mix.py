"""RWKV-7 ChannelMix (the feed-forward of every block, RWKV and sparse-attention alike).

``k = x + (x[t-1] - x[t]) * x_k``; ``out = W_v relu(W_k k)^2``. The key projection is
column-parallel, the value projection row-parallel; ``x_k`` acts on the full input and is replicated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.layers import rwkv7_init
from megatron_rwkvx.layers.tensor_parallel_utils import (
    gather_mixer_input,
    previous_token_across_ranks,
    projection_config,
    replicated_param,
)
from megatron_rwkvx.layers.token_shift import token_shift_delta


@dataclass
class RWKV7ChannelMixSubmodules:
    column_linear: Union[ModuleSpec, type] = None
    row_linear: Union[ModuleSpec, type] = None


class RWKV7ChannelMix(MegatronModule):
    """``forward(hidden_states [S, B, C]) -> (out [S, B, C], bias)``."""

    def __init__(
        self,
        config: RWKVXConfig,
        submodules: RWKV7ChannelMixSubmodules,
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
        self.key = build_module(
            submodules.column_linear,
            c,
            config.ffn_hidden_size,
            config=projection_config(config),
            init_method=rwkv7_init.uniform_init(0.5),
            bias=False,
            gather_output=False,
            skip_bias_add=True,
            disable_grad_reduce=True,
        )
        self.value = build_module(
            submodules.row_linear,
            config.ffn_hidden_size,
            c,
            config=config,
            init_method=rwkv7_init.zero_init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
        )

    def forward(self, hidden_states: torch.Tensor, previous_token: Optional[torch.Tensor] = None):
        x = gather_mixer_input(hidden_states, self.config.sequence_parallel)
        xx = token_shift_delta(x, previous_token_across_ranks(x, previous_token))
        k = x + xx * replicated_param(self.x_k)
        hidden = torch.relu(self.key(k)[0]) ** 2
        return self.value(hidden)
