"""The RWKV-X language model: embedding, ``ln0``, the pattern-driven stack, ``ln_out``, untied head.

Built per pipeline stage (``pre_process``/``post_process``) like megatron-core's ``GPTModel``: the
first stage owns the embedding and ``ln0``, the last the final norm, the head and the loss; the
stages between hand on a ``StagePayload`` (hidden states and ``v_first``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.layers import specs
from megatron_rwkvx.layers.norms import build_layer_norm
from megatron_rwkvx.models.rwkvx_stack import RWKVXStack
from megatron_rwkvx.models.stage_payload import StagePayload
from megatron_rwkvx.training.losses import L2Wrap


def _head_init(config: RWKVXConfig):
    # The official code uses an orthogonal head with gain 0.5 * sqrt(vocab / C); a scaled normal
    # of the same variance keeps tensor-parallel initialisation cheap and identical across sizes.
    std = 0.5 / (config.hidden_size**0.5)

    def init(weight: Tensor) -> None:
        with torch.no_grad():
            weight.normal_(0.0, std)

    return init


class RWKVXModel(LanguageModule):
    """``forward(input_ids [B, S], labels=None) -> logits [B, S, V/tp]`` or per-token loss [B, S].

    ``layer_specs`` maps each pattern symbol to the ``ModuleSpec`` of its block (as megatron-core's
    ``MambaModel`` takes its stack spec); the default is ``layers.specs.layer_specs(use_te)``.
    """

    def __init__(
        self,
        config: RWKVXConfig,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        vp_stage: Optional[int] = None,
        use_te: Optional[bool] = None,
        layer_specs: Optional[Dict[str, ModuleSpec]] = None,
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

        if layer_specs is None:
            layer_specs = specs.layer_specs(use_te)
        self.decoder = RWKVXStack(config, layer_specs, post_process=post_process, vp_stage=vp_stage)

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
            received = StagePayload.unpack(self.input_tensor, self.config)
            hidden, v_first = received.hidden, received.v_first
        hidden, v_first = self.decoder(hidden, v_first)
        if not self.post_process:
            return StagePayload(hidden, v_first).pack(self.config)
        logits, _ = self.output_layer(hidden)
        if labels is not None and self.training and self.config.l2wrap_factor > 0:
            logits = L2Wrap.apply(logits, self.config.l2wrap_factor, self.tp_group)
        if labels is None:
            if not self.parallel_output:
                logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)
