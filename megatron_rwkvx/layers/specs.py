"""Module specs of the RWKV-X blocks: a local spec and a Transformer-Engine spec.

The TE spec swaps in TE's fused LayerNorm for the block norms. The projections stay megatron's
tensor-parallel linears in both: the mixers gather their input once and feed all their column
projections from it (see ``tensor_parallel_utils``), which TE's column linears cannot express
without a second gradient reduction.
"""
from __future__ import annotations

from typing import Dict, Optional

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_rwkvx.config import ATTENTION_SYMBOL, RWKV_SYMBOL
from megatron_rwkvx.layers.norms import SequenceParallelLayerNorm
from megatron_rwkvx.layers.rwkv7_channel_mix import RWKV7ChannelMix
from megatron_rwkvx.layers.rwkv7_time_mix import RWKV7TimeMix
from megatron_rwkvx.layers.rwkvx_layer import RWKVXLayer, RWKVXLayerSubmodules
from megatron_rwkvx.layers.sparse_attention_block import SparseAttentionMixer
from megatron_rwkvx.layers.tensor_parallel_utils import ProjectionSubmodules


def transformer_engine_available() -> bool:
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:
        return False
    return bool(HAVE_TE)


def _norm(use_te: bool):
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return SequenceParallelLayerNorm


def _projection_spec(module: type) -> ModuleSpec:
    """A module built from megatron's tensor-parallel column and row linears."""
    return ModuleSpec(
        module=module,
        submodules=ProjectionSubmodules(
            column_linear=ColumnParallelLinear, row_linear=RowParallelLinear
        ),
    )


def channel_mix_spec() -> ModuleSpec:
    return _projection_spec(RWKV7ChannelMix)


def block_spec(mixer: ModuleSpec, use_te: Optional[bool] = None) -> ModuleSpec:
    """A block of the stack: LayerNorm, ``mixer``, LayerNorm, ChannelMix."""
    use_te = transformer_engine_available() if use_te is None else use_te
    return ModuleSpec(
        module=RWKVXLayer,
        submodules=RWKVXLayerSubmodules(
            input_norm=_norm(use_te),
            mixer=mixer,
            pre_mlp_norm=_norm(use_te),
            mlp=channel_mix_spec(),
        ),
    )


def rwkv7_layer_spec(use_te: Optional[bool] = None) -> ModuleSpec:
    """An ``R`` block: LayerNorm, RWKV-7 TimeMix, LayerNorm, ChannelMix."""
    return block_spec(_projection_spec(RWKV7TimeMix), use_te)


def sparse_attention_layer_spec(use_te: Optional[bool] = None) -> ModuleSpec:
    """An ``A`` block: LayerNorm, sparse attention, LayerNorm, ChannelMix."""
    return block_spec(_projection_spec(SparseAttentionMixer), use_te)


def layer_specs(use_te: Optional[bool] = None) -> Dict[str, ModuleSpec]:
    """Spec of each pattern symbol: what ``RWKVXModel`` builds by default."""
    return {
        RWKV_SYMBOL: rwkv7_layer_spec(use_te),
        ATTENTION_SYMBOL: sparse_attention_layer_spec(use_te),
    }
