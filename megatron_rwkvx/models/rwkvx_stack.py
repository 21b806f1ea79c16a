"""The pattern-driven stack of RWKV-X blocks for one pipeline stage.

Each stage builds only its own layers (megatron-core's ``get_transformer_layer_offset`` and
``get_num_layers_to_build``, which also handle uneven first/last stages and virtual stages); the
last stage also owns the final norm ``ln_out``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.utils import sharded_state_dict_default

from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.layers.norms import build_layer_norm
from megatron_rwkvx.models.recompute import run_layers


class RWKVXStack(MegatronModule):
    def __init__(
        self,
        config: RWKVXConfig,
        specs: Dict[str, ModuleSpec],
        post_process: bool = True,
        vp_stage: Optional[int] = None,
    ) -> None:
        super().__init__(config)
        self.post_process = post_process
        self.vp_stage = vp_stage
        offset = get_transformer_layer_offset(config, vp_stage)
        count = get_num_layers_to_build(config, vp_stage)
        self.layer_offset = offset
        missing = sorted({s for s in config.layer_pattern if s not in specs})
        if missing:
            raise ValueError(f"no layer spec for pattern symbol(s) {missing}")
        self.layers = torch.nn.ModuleList(
            build_module(specs[config.layer_pattern[i]], config=config, layer_number=i + 1)
            for i in range(offset, offset + count)
        )
        self.final_norm = (
            build_layer_norm(config, config.hidden_size, config.layernorm_epsilon)
            if post_process
            else None
        )

    def forward(self, hidden_states: torch.Tensor, v_first: Optional[torch.Tensor] = None):
        hidden_states, v_first = run_layers(self.layers, hidden_states, v_first, self.config)
        if self.final_norm is not None:
            hidden_states = self.final_norm(hidden_states)
        return hidden_states, v_first

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Checkpoint keys carry global layer numbers, so any pipeline split can load them."""
        sharded = {}
        for local_index, layer in enumerate(self.layers):
            local_prefix = f"{prefix}layers.{local_index}."
            global_prefix = f"{prefix}layers.{self.layer_offset + local_index}."
            layer_sd = layer.sharded_state_dict(local_prefix, sharded_offsets, metadata)
            replace_prefix_for_sharding(layer_sd, local_prefix, global_prefix)
            sharded.update(layer_sd)
        if self.final_norm is not None:
            sharded.update(
                sharded_state_dict_default(
                    self.final_norm, f"{prefix}final_norm.", sharded_offsets, metadata,
                    tp_group=parallel_state.get_tensor_model_parallel_group(),
                )
            )
        return sharded
