"""Adapter to flash-linear-attention's chunked DPLR kernel (``pip install flash-linear-attention``).

fla keeps the state transposed (``[K, V]``) and writes the same recurrence as
``S_t = diag(exp w_t) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T``; its ``chunk_rwkv7`` wrapper has
changed argument order between releases, so the stable keyword API of ``chunk_dplr_delta_rule`` is
called instead. Not exercised in this repository's tests (fla is not installed in CI).
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch


def fla_import_error() -> Optional[str]:
    """None when fla's DPLR kernel imports, else the reason it does not."""
    try:
        importlib.import_module("fla.ops.generalized_delta_rule")
    except Exception as exc:  # ImportError, or a broken install that fails while importing
        return f"{type(exc).__name__}: {exc}"
    return None


def wkv7_fla(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    if chunk_size is not None:
        raise ValueError("wkv7 (fla): fla picks its own chunk size; leave chunk_size=None")
    from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule

    state_kv = None if initial_state is None else initial_state.transpose(-1, -2).contiguous()
    y, final_kv = chunk_dplr_delta_rule(
        q=r, k=k, v=v, a=a, b=b, gk=w, scale=1.0,
        initial_state=state_kv, output_final_state=True,
    )
    return y, final_kv.float().transpose(-1, -2)
