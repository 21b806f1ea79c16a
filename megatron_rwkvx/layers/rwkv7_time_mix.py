"""RWKV-7 TimeMix as a megatron-core module (the mixer of an ``R`` block).

Math exactly as the official x070 code (docs/design.md section 1). Heads are split over tensor-parallel
ranks: receptance/key/value and every LoRA up-projection are column-parallel, the output is
row-parallel, per-channel parameters of the head dims are split with them, and parameters that act
on the full input (token-shift mixes, LoRA down-projections) are replicated.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.kernels.wkv7 import wkv7
from megatron_rwkvx.layers import rwkv7_init
from megatron_rwkvx.layers.tensor_parallel_utils import (
    ProjectionSubmodules,
    build_column_projection,
    build_row_projection,
    context_parallel_group,
    gather_mixer_input,
    previous_token_across_ranks,
    replicated_param,
    shard_dim0,
    tp_world_size,
)
from megatron_rwkvx.layers.token_shift import token_shift_delta
from megatron_rwkvx.parallel.cp_wkv7 import wkv7_context_parallel

# log-decay = -exp(-0.5) * sigmoid(.), so the decay exp(log-decay) lies in (0.545, 1).
DECAY_SCALE = math.exp(-0.5)

MIX_NAMES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
# Parameters split with the heads (dim 0 is the channel / head dim).
HEAD_SPLIT_VECTORS = ("w0", "a0", "v0", "k_k", "k_a", "r_k", "ln_x_weight", "ln_x_bias")


class TimeMixWithState(NamedTuple):
    """``RWKV7TimeMix.forward_with_state``: the output and what decoding carries to the next call."""

    output: Tuple[torch.Tensor, Optional[torch.Tensor]]  # (out [S, B, C], bias) of the projection
    v_first: torch.Tensor
    wkv_state: torch.Tensor  # the recurrent state after the last token, [B, H/tp, N, N]
    last_token: torch.Tensor  # the last input token [B, C]: the next call's token shift


class RWKV7TimeMix(MegatronModule):
    """``forward(hidden_states [S, B, C], v_first) -> ((out [S, B, C], bias), v_first)``; decoding
    continues from a previous call with ``forward_with_state``."""

    def __init__(
        self,
        config: RWKVXConfig,
        submodules: ProjectionSubmodules,
        layer_number: int,
        pg_collection=None,
    ) -> None:
        super().__init__(config)
        self.layer_index = layer_number - 1
        self.rwkv_index = config.rwkv_index(self.layer_index)
        # The first RWKV block of the stack makes v_first; later ones mix it in (value residual).
        self.makes_v_first = self.rwkv_index == 0
        c = config.hidden_size
        n = config.head_size
        world = tp_world_size()
        self.head_size = n
        self.local_heads = config.num_attention_heads // world
        dtype = config.params_dtype

        vectors = rwkv7_init.time_mix_vectors(c, n, self.rwkv_index, config.num_rwkv_layers)
        for name in MIX_NAMES:
            self._add_param(name, vectors[name], dtype)
        for name in HEAD_SPLIT_VECTORS:
            if name == "v0" and self.makes_v_first:
                continue
            self._add_param(name, shard_dim0(vectors[name]), dtype)
            setattr(getattr(self, name), "tensor_model_parallel", True)
            setattr(getattr(self, name), "partition_dim", 0)
            setattr(getattr(self, name), "partition_stride", 1)

        lora = {
            "w": config.decay_lora_dim,
            "a": config.a_lora_dim,
            "v": config.v_lora_dim,
            "g": config.gate_lora_dim,
        }

        def column(in_size, out_size, init):
            return build_column_projection(submodules, config, in_size, out_size, init)

        for key, width in lora.items():
            if key == "v" and self.makes_v_first:
                continue
            # LoRA down-projections start at zero, as the official init does.
            self._add_param(f"{key}1", torch.zeros(c, width), dtype)
            scale = 0.1
            setattr(self, f"{key}2", column(width, c, rwkv7_init.orthogonal_init(scale)))

        self.receptance = column(c, c, rwkv7_init.uniform_init(0.5))
        self.key = column(c, c, rwkv7_init.uniform_init(0.05))
        self.value = column(c, c, rwkv7_init.uniform_init(0.5))
        self.output = build_row_projection(submodules, config, c, c, rwkv7_init.zero_init)

    def _add_param(self, name: str, value: torch.Tensor, dtype) -> None:
        self.register_parameter(name, torch.nn.Parameter(value.to(dtype).contiguous()))

    def forward(self, hidden_states: torch.Tensor, v_first: Optional[torch.Tensor]):
        mixed = self.forward_with_state(hidden_states, v_first)
        return mixed.output, mixed.v_first

    def forward_with_state(
        self,
        hidden_states: torch.Tensor,
        v_first: Optional[torch.Tensor],
        previous_token: Optional[torch.Tensor] = None,
        initial_state: Optional[torch.Tensor] = None,
    ) -> TimeMixWithState:
        """``previous_token`` [B, C] and ``initial_state`` continue a sequence that an earlier call
        ended (None: the sequence starts here)."""
        cfg = self.config
        x = gather_mixer_input(hidden_states, cfg.sequence_parallel)
        s, b, _ = x.shape
        heads, n = self.local_heads, self.head_size
        xx = token_shift_delta(x, previous_token_across_ranks(x, previous_token))

        def mix(name):
            return x + xx * replicated_param(getattr(self, name))

        xr, xw, xk, xv, xa, xg = (mix(name) for name in MIX_NAMES)

        r = self.receptance(xr)[0]
        k = self.key(xk)[0]
        v = self.value(xv)[0]
        w_lora = self.w2(torch.tanh(xw @ replicated_param(self.w1)))[0]
        log_w = -DECAY_SCALE * torch.sigmoid((self.w0 + w_lora).float())
        a = torch.sigmoid(self.a0 + self.a2(xa @ replicated_param(self.a1))[0])
        g = self.g2(torch.sigmoid(xg @ replicated_param(self.g1)))[0]

        kk = F.normalize((k * self.k_k).view(s, b, heads, n), dim=-1, p=2.0).view(s, b, -1)
        k = k * (1 + (a - 1) * self.k_a)
        if self.makes_v_first:
            v_first = v
        else:
            if v_first is None:
                raise RuntimeError(
                    f"layer {self.layer_index} needs v_first from the first RWKV block; it was not "
                    "passed along the stack (check the pipeline split / layer pattern)"
                )
            v_gate = torch.sigmoid(self.v0 + self.v2(xv @ replicated_param(self.v1))[0])
            v = v + (v_first - v) * v_gate

        y, final_state = self._recurrence(r, log_w, k, v, -kk, kk * a, initial_state)

        y = F.group_norm(
            y.reshape(s * b, heads * n).float(),
            heads,
            self.ln_x_weight.float(),
            self.ln_x_bias.float(),
            eps=cfg.rwkv_ln_x_eps,
        ).to(r.dtype).view(s, b, -1)
        bonus = (r * k * self.r_k.view(-1)).view(s, b, heads, n).sum(dim=-1, keepdim=True)
        y = y + (bonus * v.view(s, b, heads, n)).view(s, b, -1)
        return TimeMixWithState(self.output(y * g), v_first, final_state, x[-1])

    def _recurrence(self, r, log_w, k, v, a, b, initial_state):
        s, bsz, _ = r.shape
        heads, n = self.local_heads, self.head_size

        def to_bthn(t):
            return t.view(s, bsz, heads, n).transpose(0, 1)

        cp_group = context_parallel_group()
        if cp_group is not None:
            if initial_state is not None:
                raise ValueError("an initial state cannot be combined with context parallelism")
            # State passing: each rank folds its predecessors' (transition, state) summaries.
            y, state = wkv7_context_parallel(
                to_bthn(r), to_bthn(log_w.to(r.dtype)), to_bthn(k), to_bthn(v), to_bthn(a),
                to_bthn(b), cp_group, self.config.wkv_backend, return_final_state=True,
            )
            return y.transpose(0, 1).reshape(s, bsz, heads * n), state

        y, state = wkv7(
            to_bthn(r),
            to_bthn(log_w.to(r.dtype)),
            to_bthn(k),
            to_bthn(v),
            to_bthn(a),
            to_bthn(b),
            initial_state,
            backend=self.config.wkv_backend,
        )
        return y.transpose(0, 1).reshape(s, bsz, heads * n), state

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        axis_map = {name: 0 for name in HEAD_SPLIT_VECTORS if name in own}
        sharded = make_sharded_tensors_for_checkpoint(
            own, prefix, axis_map, sharded_offsets,
            tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"],
        )
        for name, module in self.named_children():
            sharded.update(
                sharded_state_dict_default(
                    module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=tp_group
                )
            )
        return sharded
