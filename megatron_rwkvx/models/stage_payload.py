"""What one pipeline stage hands the next: the hidden states and ``v_first``, as one tensor.

megatron-core's schedules send one tensor of a fixed shape between stages, sized by the
``seq_length`` they are given. Every RWKV block after the first needs ``v_first`` (the value
residual of docs/design.md section 1), so it travels with the hidden states: the payload is the
hidden states ``[S_h, B, C]`` followed by ``v_first`` (``[S, B, C/tp]``: the full sequence, this
rank's heads) viewed as ``[S/tp, B, C]`` rows. ``S_h`` is ``S/tp`` under sequence parallelism,
else ``S``. The schedule's ``seq_length`` and the unpacking both follow from that one rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


def _hidden_rows(config, seq_length: int) -> int:
    """Rows of the hidden states for a sequence of ``seq_length`` tokens."""
    tp = config.tensor_model_parallel_size
    return seq_length // tp if config.sequence_parallel else seq_length


def _payload_rows(config, seq_length: int) -> int:
    """Rows of the packed payload: the hidden states, then ``v_first`` as ``seq_length / tp`` rows."""
    return _hidden_rows(config, seq_length) + seq_length // config.tensor_model_parallel_size


def _seq_length_of(config, payload_rows: int) -> int:
    """The sequence length whose payload has ``payload_rows`` rows (inverse of ``_payload_rows``)."""
    tp = config.tensor_model_parallel_size
    per_token = 2 if config.sequence_parallel else tp + 1  # payload rows per tp tokens
    return payload_rows * tp // per_token


@dataclass(frozen=True)
class StagePayload:
    hidden: Tensor  # [S_h, B, C]
    v_first: Optional[Tensor]  # [S, B, C/tp]; None before the first RWKV block

    @staticmethod
    def schedule_seq_length(config, seq_length: int) -> int:
        """The ``seq_length`` to give megatron's schedules so that their p2p tensor (which they
        shape as ``seq_length / tp`` rows under sequence parallelism) holds the payload."""
        if config.pipeline_model_parallel_size == 1:
            return seq_length
        rows = _payload_rows(config, seq_length)
        return rows * config.tensor_model_parallel_size if config.sequence_parallel else rows

    def pack(self, config) -> Tensor:
        """The tensor to send to the next stage (the hidden states alone without pipelining)."""
        if config.pipeline_model_parallel_size == 1:
            return self.hidden
        tp = config.tensor_model_parallel_size
        s_h, b, c = self.hidden.shape
        seq_length = s_h * tp if config.sequence_parallel else s_h
        v_first = self.v_first
        if v_first is None:  # no RWKV block yet: the slot still travels (fixed shape)
            v_first = self.hidden.new_zeros(seq_length, b, c // tp)
        v_rows = v_first.contiguous().view(seq_length // tp, b, c)
        return torch.cat([self.hidden, v_rows.to(self.hidden.dtype)], dim=0)

    @classmethod
    def unpack(cls, packed: Tensor, config) -> "StagePayload":
        """The payload a stage received (``packed`` is the hidden states alone without pipelining)."""
        if config.pipeline_model_parallel_size == 1:
            return cls(packed, None)
        rows, b, c = packed.shape
        seq_length = _seq_length_of(config, rows)
        s_h = _hidden_rows(config, seq_length)
        v_first = packed[s_h:].contiguous().view(seq_length, b, c // config.tensor_model_parallel_size)
        return cls(packed[:s_h], v_first)
