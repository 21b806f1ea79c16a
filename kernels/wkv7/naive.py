"""The reference backend: the RWKV-7 recurrence one token at a time, in fp32, with plain autograd.

Slow (a Python loop over T) and memory-hungry under autograd (one state per token); it exists to
pin down the numbers every other backend must reproduce.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def wkv7_naive(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token loop: ``S_t = S_{t-1} diag(exp w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T``, ``y_t = S_t r_t``.

    Inputs ``[B, T, H, N]`` (validated by the caller), state ``[B, H, N_v, N_k]`` fp32.
    ``chunk_size`` is accepted for interface uniformity and has no meaning here.
    """
    del chunk_size
    B, T, H, N = r.shape
    r, w, k, v, a, b = (t.float() for t in (r, w, k, v, a, b))
    decay = torch.exp(w)
    if initial_state is None:
        state = r.new_zeros(B, H, N, N)
    else:
        state = initial_state
    ys = []
    # unbind, not x[:, t]: indexing would give each step's backward a full-size zero gradient,
    # making the reference's backward quadratic in T.
    steps = zip(*(x.unbind(1) for x in (r, decay, k, v, a, b)))
    for r_t, d_t, k_t, v_t, a_t, b_t in steps:
        sa = state @ a_t[..., :, None]
        state = (
            state * d_t[..., None, :]
            + sa @ b_t[..., None, :]
            + v_t[..., :, None] @ k_t[..., None, :]
        )
        ys.append((state @ r_t[..., :, None]).squeeze(-1))
    if T == 0:
        y = r.new_empty(B, 0, H, N)
    else:
        y = torch.stack(ys, dim=1)
    if state is initial_state:
        state = state.clone()
    return y, state
