"""Initial values of RWKV-7 parameters, following the official x070 training code's scheme.

Values are computed at full width (deterministic, or drawn from the CPU generator) and sliced per
tensor-parallel rank by the caller, so a model initialises identically at any tensor-parallel size.
Training normally starts from a pretrained checkpoint; these values matter for from-scratch runs
(the CPU demo, tests).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch


def _ratios(rwkv_index: int, num_rwkv_layers: int):
    ratio_0_to_1 = rwkv_index / max(num_rwkv_layers - 1, 1)
    ratio_1_to_almost0 = 1.0 - rwkv_index / num_rwkv_layers
    return ratio_0_to_1, ratio_1_to_almost0


def _ramp(hidden_size: int) -> torch.Tensor:
    return torch.arange(hidden_size, dtype=torch.float32) / hidden_size


def orthogonal(rows: int, cols: int, scale: float) -> torch.Tensor:
    """Orthogonal init with the official gain rule (gain grows for tall matrices)."""
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    weight = torch.empty(rows, cols)
    torch.nn.init.orthogonal_(weight, gain=gain * scale)
    return weight


def time_mix_vectors(
    hidden_size: int, head_size: int, rwkv_index: int, num_rwkv_layers: int
) -> Dict[str, torch.Tensor]:
    """Per-channel TimeMix parameters at full width (shapes [C], r_k [H, N])."""
    c = hidden_size
    ratio_0_to_1, ratio_1_to_almost0 = _ratios(rwkv_index, num_rwkv_layers)
    ddd = _ramp(c)
    n = torch.arange(c, dtype=torch.float32)
    linear = n / (c - 1) - 0.5
    zigzag = ((n % head_size) - (head_size - 1) / 2) / ((head_size - 1) / 2)
    zigzag = zigzag * zigzag.abs()
    www = -6 + 6 * (n / (c - 1)) ** (1 + 1 * ratio_0_to_1**0.3)
    num_layers_ratio = ((1 + rwkv_index) / num_rwkv_layers) ** 0.7
    return {
        "x_r": 1.0 - ddd.pow(0.2 * ratio_1_to_almost0),
        "x_w": 1.0 - ddd.pow(0.9 * ratio_1_to_almost0),
        "x_k": 1.0 - ddd.pow(0.7 * ratio_1_to_almost0),
        "x_v": 1.0 - ddd.pow(0.7 * ratio_1_to_almost0),
        "x_a": 1.0 - ddd.pow(0.9 * ratio_1_to_almost0),
        "x_g": 1.0 - ddd.pow(0.2 * ratio_1_to_almost0),
        "w0": www + 0.5 + zigzag * 2.5,
        "a0": torch.zeros(c) - 0.19 + zigzag * 0.3 + linear * 0.4,
        "v0": torch.zeros(c) + 0.73 - linear * 0.4,
        "k_k": torch.zeros(c) + 0.71 - linear * 0.1,
        "k_a": torch.zeros(c) + 1.02,
        "r_k": torch.zeros(c // head_size, head_size) - 0.04,
        "ln_x_weight": torch.full((c,), num_layers_ratio),
        "ln_x_bias": torch.zeros(c),
    }


def channel_mix_vector(hidden_size: int, rwkv_index: int, num_rwkv_layers: int) -> torch.Tensor:
    _, ratio_1_to_almost0 = _ratios(rwkv_index, num_rwkv_layers)
    return 1.0 - _ramp(hidden_size).pow(ratio_1_to_almost0**4)


def uniform_init(scale: float, generator: Optional[torch.Generator] = None):
    """An ``init_method`` for megatron linears: U(-scale/sqrt(fan_in), +scale/sqrt(fan_in)), drawn
    from ``generator`` when given (the expansion's seeded draw) or the global RNG."""

    def init(weight: torch.Tensor) -> None:
        bound = scale / math.sqrt(weight.shape[1])
        with torch.no_grad():
            weight.uniform_(-bound, bound, generator=generator)

    return init


def zero_init(weight: torch.Tensor) -> None:
    with torch.no_grad():
        weight.zero_()


def orthogonal_init(scale: float):
    """``init_method`` for LoRA up-projections stored as [out, in] linears."""

    def init(weight: torch.Tensor) -> None:
        # The official matrix is [in, out] (x @ W); the linear stores its transpose.
        with torch.no_grad():
            weight.copy_(orthogonal(weight.shape[1], weight.shape[0], scale).t())

    return init
