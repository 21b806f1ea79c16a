"""Token shift: each position sees the previous token's input (zero before the first token)."""
from __future__ import annotations

from typing import Optional

import torch


def token_shift_delta(x: torch.Tensor, previous: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x[t-1] - x[t]`` for ``x`` of shape [S, B, C] (sequence first, megatron's layout).

    ``previous`` ([B, C]) is the token before ``x[0]`` (from the previous context-parallel rank or
    an inference state); zero when None.
    """
    if previous is None:
        first = torch.zeros_like(x[:1])
    else:
        first = previous.unsqueeze(0).to(x.dtype)
    shifted = torch.cat([first, x[:-1]], dim=0)
    return shifted - x
