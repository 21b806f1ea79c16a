"""``--rwkv-fade-in START END``: the RWKV-7 blocks' change to the residual stream is multiplied by a
gate that is 0 up to iteration START and rises linearly to 1 at END.

Not the reference recipe. Why it exists (docs/retrieval_study.md, finding 18): in the toy MQAR the
zero-init sparse blocks of a stage 1 learned no content lookup beside the trained RWKV-7 blocks
(0 of 7 runs), but learned it completely within a few hundred steps with those blocks silenced, and
kept it while they were faded back in. The gate is a training-time schedule only: a checkpoint
records the schedule (a resume must keep it) but no gate, and a model saved before END is not the
model that was trained (the run warns).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from megatron_rwkvx.config import RWKV_SYMBOL


def gate_at(iteration: int, window: Optional[Sequence[int]]) -> float:
    """The gate for 1-based ``iteration`` (the one about to run) under ``window`` = (START, END)."""
    if not window:
        return 1.0
    start, end = window
    if iteration <= start:
        return 0.0
    if iteration >= end:
        return 1.0
    return (iteration - start) / (end - start)


def set_rwkv_gate(chunks: Iterable[torch.nn.Module], gate: float) -> None:
    """Set the gate on every RWKV-7 layer this rank holds (each pipeline stage its own)."""
    for chunk in chunks:
        decoder = getattr(chunk, "decoder", None)
        for layer in getattr(decoder, "layers", ()):
            if layer.symbol == RWKV_SYMBOL:
                layer.residual_gate = gate
