"""The ``fla`` backend of ``wkv7``: flash-linear-attention's chunked DPLR kernel
(``pip install flash-linear-attention``). Importing this module registers it; the import fails
when fla is not installed, and the registry reports that.

fla keeps the state transposed (``[K, V]``) and writes the same recurrence as
``S_t = diag(exp w_t) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T`` (so our ``a = -kk``,
``b = kk * rate`` pass unchanged), with queries scaled by ``scale`` (1 for RWKV-7). Its
``chunk_rwkv7`` wrapper has changed between releases (the decay as ``w`` with ``log_w =
-exp(w)``, or as ``log_w``; one release forwards ``w`` even when only ``log_w`` is given), so the
keyword API it wraps, ``chunk_dplr_delta_rule(q, k, v, a, b, gk=log decay, scale,
initial_state, output_final_state)``, stable across releases, is called instead. ``auto``
checks the result against the torch path before it may use it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule

from .dispatch import register_backend


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
    state_kv = None if initial_state is None else initial_state.transpose(-1, -2).contiguous()
    y, final_kv = chunk_dplr_delta_rule(
        q=r, k=k, v=v, a=a, b=b, gk=w, scale=1.0,
        initial_state=state_kv, output_final_state=True,
    )
    return y, final_kv.float().transpose(-1, -2)


register_backend("fla", wkv7_fla, lambda r: r.is_cuda)
