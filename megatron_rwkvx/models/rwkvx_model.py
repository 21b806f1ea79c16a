"""The RWKV-X language model: embedding, ``ln0``, the pattern-driven stack, ``ln_out``, untied head.

Built per pipeline stage (``pre_process``/``post_process``) like megatron-core's ``GPTModel``: the
first stage owns the embedding and ``ln0``, the last the final norm, the head and the loss.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule

from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.layers.norms import build_layer_norm
from megatron_rwkvx.layers.specs import layer_specs
from megatron_rwkvx.models.rwkvx_stack import RWKVXStack


def pipeline_seq_length(config: RWKVXConfig, seq_length: int) -> int:
    """The ``seq_length`` to give megatron's pipeline schedules so that the tensor they send between
    stages has room for the hidden states *and* ``v_first`` (see :func:`pack_stage_output`)."""
    if config.pipeline_model_parallel_size == 1:
        return seq_length
    tp = config.tensor_model_parallel_size
    if config.sequence_parallel:
        return 2 * seq_length
    return seq_length * (tp + 1) // tp


def pack_stage_output(hidden: Tensor, v_first: Optional[Tensor], config: RWKVXConfig) -> Tensor:
    """One tensor for the next pipeline stage: hidden [S_h, B, C] followed by v_first viewed as
    [S / tp, B, C] rows (v_first is [S, B, C / tp]: full sequence, this rank's heads).

    megatron's p2p sends one tensor of a fixed shape, and every RWKV block after the first needs
    v_first, so it travels with the hidden states.
    """
    if config.pipeline_model_parallel_size == 1:
        return hidden
    tp = config.tensor_model_parallel_size
    s_h, b, c = hidden.shape
    full_s = s_h * tp if config.sequence_parallel else s_h
    if v_first is None:  # no RWKV block yet: the slot still travels (fixed shape)
        v_first = hidden.new_zeros(full_s, b, c // tp)
    v_rows = v_first.contiguous().view(full_s // tp, b, c)
    return torch.cat([hidden, v_rows.to(hidden.dtype)], dim=0)


def unpack_stage_output(packed: Tensor, config: RWKVXConfig):
    if config.pipeline_model_parallel_size == 1:
        return packed, None
    tp = config.tensor_model_parallel_size
    rows, b, c = packed.shape
    s_h = rows // 2 if config.sequence_parallel else rows * tp // (tp + 1)
    hidden = packed[:s_h]
    full_s = s_h * tp if config.sequence_parallel else s_h
    v_first = packed[s_h:].contiguous().view(full_s, b, c // tp)
    return hidden, v_first


def _head_init(config: RWKVXConfig):
    # The official code uses an orthogonal head with gain 0.5 * sqrt(vocab / C); a scaled normal
    # of the same variance keeps tensor-parallel initialisation cheap and identical across sizes.
    std = 0.5 / (config.hidden_size**0.5)

    def init(weight: Tensor) -> None:
        with torch.no_grad():
            weight.normal_(0.0, std)

    return init


class RWKVXModel(LanguageModule):
    """``forward(input_ids [B, S], labels=None) -> logits [B, S, V/tp]`` or per-token loss [B, S]."""

    def __init__(
        self,
        config: RWKVXConfig,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        vp_stage: Optional[int] = None,
        use_te: Optional[bool] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self.config: RWKVXConfig = config
        self.pre_process = pre_process
        self.post_process = post_process
        self.parallel_output = parallel_output
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        self.vocab_size = config.vocab_size
        self.input_tensor = None

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=config.vocab_size,
                max_sequence_length=0,  # no position embedding
                position_embedding_type="none",
            )
            if config.use_cpu_initialization or not torch.cuda.is_available():
                with torch.no_grad():
                    # Official RWKV-7 embedding init: tiny uniform, then ln0 normalises it.
                    self.embedding.word_embeddings.weight.uniform_(-1e-4, 1e-4)
            self.ln0 = build_layer_norm(config, config.hidden_size, config.layernorm_epsilon)

        self.decoder = RWKVXStack(
            config, layer_specs(use_te), post_process=post_process, vp_stage=vp_stage
        )

        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                config.vocab_size,
                config=config,
                init_method=_head_init(config),
                bias=False,
                skip_bias_add=False,
                # The loss works on vocabulary shards; logits are gathered only when returned.
                gather_output=False,
            )

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first receive their input from the previous stage."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        **unused,
    ) -> Tensor:
        v_first = None
        if self.pre_process:
            hidden = self.embedding(input_ids=input_ids, position_ids=None)
            hidden = self.ln0(hidden)
        else:
            hidden, v_first = unpack_stage_output(self.input_tensor, self.config)
        hidden, v_first = self.decoder(hidden, v_first)
        if not self.post_process:
            return pack_stage_output(hidden, v_first, self.config)
        logits, _ = self.output_layer(hidden)
        if labels is not None and self.training and self.config.l2wrap_factor > 0:
            from megatron_rwkvx.training.losses import L2Wrap

            logits = L2Wrap.apply(logits, self.config.l2wrap_factor, self.tp_group)
        if labels is None:
            if not self.parallel_output:
                logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)
