"""Validation of the ``wkv7`` inputs, shared by every backend."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INPUT_NAMES = ("r", "w", "k", "v", "a", "b")

# The chunked backends may form a chunk's decayed pair products as one matrix product of tiles
# rescaled by e^(g_t - g_L) (query side, at most e^(L max|w|)) and e^(g_L - g_j) (key side, at
# least e^-(L max|w|)). Below this exponent nothing overflows fp32 (e^88) or falls into its
# subnormals (e^-87); above it they use the exact per-difference form. RWKV-7's decay has
# |w| <= e^-0.5, i.e. L max|w| <= 38.8 even for 64-token chunks.
FACTOR_EXPONENT_LIMIT = 60.0


def log_decay_min(w: torch.Tensor, backend: str) -> Optional[float]:
    """The smallest log-decay of ``w`` (None when empty), after checking that ``w`` is finite and
    <= 0, which the chunked backends' numerics rest on. One read of ``w``: a device sync on a GPU."""
    if not w.numel():
        return None
    with torch.no_grad():
        w_max, w_min = (float(x) for x in torch.stack([w.max(), w.min()]).float().tolist())
    if not (math.isfinite(w_max) and math.isfinite(w_min)) or w_max > 0:
        raise ValueError(
            f"wkv7 ({backend}): w must be the log decay, finite and <= 0 (decay exp(w) in (0, 1]); "
            f"got max {w_max:.4g}, min {w_min:.4g}; pass log(decay), not the decay itself"
        )
    return w_min


def factored_pairs_fit(chunk: int, w_min: float) -> bool:
    """Whether chunks of ``chunk`` tokens with log-decays >= ``w_min`` may use the factored form."""
    return chunk * -w_min <= FACTOR_EXPONENT_LIMIT


def check_inputs(tensors: Sequence[torch.Tensor], initial_state: Optional[torch.Tensor]) -> None:
    """Raise a ValueError/TypeError naming the problem unless the inputs follow the wkv7 contract."""
    for name, t in zip(INPUT_NAMES, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"wkv7: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"wkv7: {name} must have shape [B, T, H, N] (4 dims), got {tuple(t.shape)}; "
                "split the channels into heads with .view(B, T, H, N)"
            )
    r = tensors[0]
    for name, t in zip(INPUT_NAMES[1:], tensors[1:]):
        if t.shape != r.shape:
            raise ValueError(
                f"wkv7: all inputs must share r's shape {tuple(r.shape)}; {name} has {tuple(t.shape)}"
            )
        if t.dtype != r.dtype:
            raise TypeError(
                f"wkv7: all inputs must share r's dtype {r.dtype}; {name} is {t.dtype} "
                "(cast them to one dtype, e.g. w.to(r.dtype))"
            )
        if t.device != r.device:
            raise ValueError(f"wkv7: {name} is on {t.device} but r is on {r.device}")
    if r.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"wkv7: inputs must be float32, float16 or bfloat16, got {r.dtype}"
        )
    if r.shape[3] == 0:
        raise ValueError("wkv7: the head size N (last dim) must be at least 1")
    if initial_state is None:
        return
    if not isinstance(initial_state, torch.Tensor):
        raise TypeError(
            f"wkv7: initial_state must be a tensor or None, got {type(initial_state).__name__}"
        )
    B, _, H, N = r.shape
    if tuple(initial_state.shape) != (B, H, N, N):
        raise ValueError(
            f"wkv7: initial_state must have shape [B, H, N, N] = {(B, H, N, N)} "
            f"(rows = value dim, cols = key dim), got {tuple(initial_state.shape)}"
        )
    if initial_state.dtype != torch.float32:
        raise TypeError(
            f"wkv7: initial_state must be float32 (the recurrence runs in fp32), got "
            f"{initial_state.dtype}; pass initial_state.float()"
        )
    if initial_state.device != r.device:
        raise ValueError(f"wkv7: initial_state is on {initial_state.device} but r is on {r.device}")
