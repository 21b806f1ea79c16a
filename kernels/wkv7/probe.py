"""Model-like WKV-7 inputs, and the short forward+backward that ``auto`` times and checks."""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..registry import ProbeCase

# RWKV-7's log decay lies in [-exp(-0.5), 0) (DESIGN.md, TimeMix).
LOG_DECAY_MIN = -math.exp(-0.5)
# Long enough that a chunked kernel's sequential pass shows in the timing, short enough that the
# probe of every candidate (and the fp32 torch reference) takes well under a second on a GPU.
PROBE_TOKENS = 4096


def model_like_inputs(B: int, T: int, H: int, N: int, *, dtype=torch.float32, device="cpu",
                      seed: int = 0, w_min: float = LOG_DECAY_MIN) -> List[torch.Tensor]:
    """``r, w, k, v, a, b`` shaped like the model's: w the log decay in [w_min, 0), a = -kk and
    b = kk * rate with kk unit-norm per head."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(scale=1.0):
        return torch.randn(B, T, H, N, generator=gen, device=device) * scale

    r, k, v = randn(0.5), randn(0.5), randn(0.5)
    w = w_min * torch.sigmoid(randn())
    kk = F.normalize(randn(), dim=-1)
    rate = torch.sigmoid(randn())
    return [t.to(dtype) for t in (r, w, k, v, -kk, kk * rate)]


def _forward_backward(fn: Callable, inputs: Sequence[torch.Tensor], state: Optional[torch.Tensor] = None):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y, final = fn(*leaves, state, None)
    grads = torch.autograd.grad((y, final), leaves, (torch.ones_like(y), torch.ones_like(final)))
    return [y.float(), final.float(), *grads]


def probe_case(r: torch.Tensor, call: dict) -> ProbeCase:
    """One sequence of up to ``PROBE_TOKENS`` tokens with the call's heads and head size."""
    _, T, H, N = r.shape
    T = max(1, min(T, PROBE_TOKENS))
    inputs = model_like_inputs(1, T, H, N, dtype=r.dtype, device=r.device, seed=1234)
    return ProbeCase(inputs=inputs, run=_forward_backward, shape=f"B=1 T={T} H={H} N={N}")
