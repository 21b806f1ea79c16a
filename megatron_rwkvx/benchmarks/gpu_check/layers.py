"""The layers the GPU check times: the project's own blocks (``megatron_rwkvx.layers``), so that
the layers timed are the layers trained. An RWKV-7 block (LayerNorm, TimeMix with WKV-7,
LayerNorm, ChannelMix), a sparse-attention block (LayerNorm, q/k/v/o, top-k chunk attention,
LayerNorm, ChannelMix), and the dense baseline: the same attention block with
``attention_mode="dense"`` (causal SDPA, the flash kernel on a GPU, in place of the top-k
operator). Needs megatron-core.
"""
from __future__ import annotations

from typing import Dict

import torch
from megatron.core.transformer.spec_utils import build_module

from megatron_rwkvx.config import ATTENTION_SYMBOL, DENSE_MODE, RWKV_SYMBOL, SPARSE_MODE, RWKVXConfig
from megatron_rwkvx.layers.specs import layer_specs
from megatron_rwkvx.pretrained import prepare_runtime

# The timed RWKV block is a later one of the stack (it mixes v_first in, as all but the first do).
PATTERN = RWKV_SYMBOL * 2 + ATTENTION_SYMBOL
RWKV_LAYER, ATTENTION_LAYER = 2, 3


def build_blocks(device, dtype, hidden, head_size, chunk, top_k, wkv_backend, sparse_backend) -> Dict[str, torch.nn.Module]:
    """{"rwkv7", "sparse", "dense"}: one block each, on ``device`` in ``dtype``, seeded."""
    prepare_runtime(device)
    torch.manual_seed(0)

    def config(mode):
        return RWKVXConfig(
            hidden_size=hidden, head_size=head_size, layer_pattern=PATTERN,
            params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=True,
            sparse_chunk_size=chunk, sparse_top_k=top_k,
            wkv_backend=wkv_backend, sparse_attention_backend=sparse_backend, attention_mode=mode,
        )

    specs = layer_specs()
    blocks = {
        "rwkv7": build_module(specs[RWKV_SYMBOL], config=config(SPARSE_MODE), layer_number=RWKV_LAYER),
        "sparse": build_module(specs[ATTENTION_SYMBOL], config=config(SPARSE_MODE), layer_number=ATTENTION_LAYER),
        "dense": build_module(specs[ATTENTION_SYMBOL], config=config(DENSE_MODE), layer_number=ATTENTION_LAYER),
    }
    return {name: block.to(device=device, dtype=dtype) for name, block in blocks.items()}


def block_names(blocks: Dict[str, torch.nn.Module]) -> Dict[str, str]:
    """Each block's class and its mixer's class, by module path (what the JSON records)."""
    def path(m):
        return f"{type(m).__module__}.{type(m).__qualname__}"
    return {name: f"{path(b)}({path(b.mixer)})" for name, b in blocks.items()}
