"""The RWKV-X sparse-attention block: LayerNorm, top-k chunk attention, LayerNorm, ChannelMix.

Four bias-free projections (query, key, value, output), heads of ``head_size`` split over
tensor-parallel ranks, softmax scale 1/sqrt(head_size) and no positional encoding: position comes
from the RWKV blocks. ``v_first`` passes through untouched. With ``sparse_token_shift`` (not in the
reference) each projection reads ``x + mu * (x[t-1] - x)``, mu learned per channel (``x_r``, ``x_k``,
``x_v``, named as in RWKV's blocks, where the query is the receptance). Grouped-query attention (fewer
key/value heads) is available through ``num_query_groups``; the default is plain multi-head.
With ``attention_mode="dense"`` the block computes dense causal attention instead (the baseline of
the same size; the config refuses it with context parallelism).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_rwkvx.config import (
    DENSE_MODE,
    SPARSE_QK_INIT_SCALE,
    SPARSE_SHIFT_INIT,
    SPARSE_SHIFT_MIXES,
    SPARSE_VALUE_INIT_SCALE,
    RWKVXConfig,
)
from megatron_rwkvx.kernels.sparse_attention import dense_causal_attention, topk_chunk_attention
from megatron_rwkvx.layers import rwkv7_init
from megatron_rwkvx.layers.tensor_parallel_utils import (
    ProjectionSubmodules,
    build_column_projection,
    build_row_projection,
    context_parallel_group,
    gather_mixer_input,
    previous_token_across_ranks,
    replicated_param,
    tp_world_size,
)
from megatron_rwkvx.layers.token_shift import token_shift_delta
from megatron_rwkvx.parallel.cp_sparse_attention import topk_chunk_attention_context_parallel


class SparseAttentionMixer(MegatronModule):
    """``forward(hidden_states [S, B, C], v_first) -> ((out [S, B, C], bias), v_first)``."""

    def __init__(
        self,
        config: RWKVXConfig,
        submodules: ProjectionSubmodules,
        layer_number: int,
        pg_collection=None,
    ) -> None:
        super().__init__(config)
        c, n = config.hidden_size, config.head_size
        world = tp_world_size()
        self.head_size = n
        self.local_heads = config.num_attention_heads // world
        kv_heads = config.num_query_groups or config.num_attention_heads
        self.local_kv_heads = kv_heads // world
        def column(out_size, scale):
            return build_column_projection(
                submodules, config, c, out_size, rwkv7_init.uniform_init(scale)
            )

        self.query = column(c, SPARSE_QK_INIT_SCALE)
        self.key = column(kv_heads * n, SPARSE_QK_INIT_SCALE)
        self.value = column(kv_heads * n, SPARSE_VALUE_INIT_SCALE)
        # Zero output: a freshly inserted block starts as the identity.
        self.output = build_row_projection(submodules, config, c, c, rwkv7_init.zero_init)
        if config.sparse_token_shift:
            # Replicated: they act on the full (gathered) input, before the head split.
            for name in SPARSE_SHIFT_MIXES:
                value = torch.full((c,), SPARSE_SHIFT_INIT, dtype=config.params_dtype)
                self.register_parameter(name, torch.nn.Parameter(value))

    def project(self, x: torch.Tensor, previous_token: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values [S, B, heads, N] of the gathered input ``x`` [S, B, C].

        ``previous_token`` [B, C]: the input before ``x[0]`` (decoding; otherwise the previous
        context-parallel rank's last token, or zeros at the sequence start). Used only with
        ``sparse_token_shift``."""
        s, b, _ = x.shape
        n = self.head_size
        xq = xk = xv = x
        if self.config.sparse_token_shift:
            xx = token_shift_delta(x, previous_token_across_ranks(x, previous_token))
            xq, xk, xv = (x + xx * replicated_param(getattr(self, name)) for name in SPARSE_SHIFT_MIXES)
        q = self.query(xq)[0].view(s, b, self.local_heads, n)
        k = self.key(xk)[0].view(s, b, self.local_kv_heads, n)
        v = self.value(xv)[0].view(s, b, self.local_kv_heads, n)
        return q, k, v

    def forward(self, hidden_states: torch.Tensor, v_first: Optional[torch.Tensor] = None):
        x = gather_mixer_input(hidden_states, self.config.sequence_parallel)
        s, b, _ = x.shape
        n = self.head_size
        q, k, v = (t.transpose(0, 1) for t in self.project(x))
        cp_group = context_parallel_group()
        if self.config.attention_mode == DENSE_MODE:
            out = dense_causal_attention(q, k, v, scale=n**-0.5)
        elif cp_group is not None:
            # Queries of this shard against the keys of all earlier shards (chunk-aligned).
            out = topk_chunk_attention_context_parallel(
                q, k, v,
                chunk_size=self.config.sparse_chunk_size,
                top_k=self.config.sparse_top_k,
                scale=n**-0.5,
                group=cp_group,
                backend=self.config.sparse_attention_backend,
                selection=self.config.sparse_selection,
            )
        else:
            out = topk_chunk_attention(
                q,
                k,
                v,
                chunk_size=self.config.sparse_chunk_size,
                top_k=self.config.sparse_top_k,
                scale=n**-0.5,
                backend=self.config.sparse_attention_backend,
                selection=self.config.sparse_selection,
            )
        out = out.transpose(0, 1).reshape(s, b, self.local_heads * n)
        return self.output(out), v_first

