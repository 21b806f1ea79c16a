"""One block of the RWKV-X stack: ``x += mixer(norm1(x)); x += channel_mix(norm2(x))``.

The mixer is an RWKV-7 TimeMix (``R``) or a sparse attention (``A``); both take and return
``v_first`` (the attention passes it through untouched), so the block and the stack need not know
which is which.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_rwkvx.config import RWKVXConfig


@dataclass
class RWKVXLayerSubmodules:
    input_norm: Union[ModuleSpec, type] = None
    mixer: Union[ModuleSpec, type] = None
    pre_mlp_norm: Union[ModuleSpec, type] = None
    mlp: Union[ModuleSpec, type] = None


class RWKVXLayer(MegatronModule):
    def __init__(
        self,
        config: RWKVXConfig,
        submodules: RWKVXLayerSubmodules,
        layer_number: int = 1,
        pg_collection=None,
    ) -> None:
        super().__init__(config)
        self.layer_number = layer_number
        self.symbol = config.layer_pattern[layer_number - 1]
        c = config.hidden_size
        self.input_norm = build_module(submodules.input_norm, config, c, config.layernorm_epsilon)
        self.mixer = build_module(submodules.mixer, config=config, layer_number=layer_number)
        self.pre_mlp_norm = build_module(submodules.pre_mlp_norm, config, c, config.layernorm_epsilon)
        self.mlp = build_module(submodules.mlp, config=config, layer_number=layer_number)
        # --rwkv-fade-in (training only, RWKV-7 layers): the share of this block's change to the
        # stream that is kept; 1 is the block itself
        self.residual_gate = 1.0

    def forward(self, hidden_states: torch.Tensor, v_first: Optional[torch.Tensor] = None):
        block_input = hidden_states
        (mixed, _), v_first = self.mixer(self.input_norm(hidden_states), v_first)
        hidden_states = hidden_states + mixed
        out, _ = self.mlp(self.pre_mlp_norm(hidden_states))
        hidden_states = hidden_states + out
        if self.residual_gate != 1.0:
            hidden_states = block_input + self.residual_gate * (hidden_states - block_input)
        return hidden_states, v_first
