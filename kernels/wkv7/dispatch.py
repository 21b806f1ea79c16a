"""The WKV-7 operator's backends (``kernels/registry.py``) and its entry point ``wkv7``.

Roles: ``reference`` (token loop, the numerical definition; old name ``naive``), ``torch``
(chunked PyTorch, any device; old name ``chunked``), ``triton`` (``triton_backend.py``) and
``fla`` (flash-linear-attention, ``fla_backend.py``); the last two are plug-ins that register
themselves when imported. A backend is called as ``fn(r, w, k, v, a, b, initial_state,
chunk_size)`` with validated inputs (``[B, T, H, N]``, one dtype, ``initial_state`` fp32
``[B, H, N, N]`` or None, ``T >= 1``) and returns ``(y, final_state)``: y ``[B, T, H, N]`` in
any float dtype (cast to the input dtype here), final_state fp32.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..registry import REFERENCE, TORCH, TRITON, Operator, Plugin
from .checks import check_inputs
from .chunked import wkv7_chunked
from .naive import wkv7_naive
from .probe import probe_case

WKV7 = Operator(
    "wkv7",
    plugins=[
        Plugin(TRITON, f"{__package__}.triton_backend"),
        Plugin("fla", f"{__package__}.fla_backend", library="fla",
               hint="pip install flash-linear-attention"),
    ],
    aliases={"naive": REFERENCE, "chunked": TORCH},
    probe=probe_case,
)


# The operator's public registry functions (the plug-in modules and tests use these).
register_backend = WKV7.register
available_backends = WKV7.available


def resolve_backend(backend: str, r: torch.Tensor) -> Callable:
    """The function that ``wkv7(..., backend=backend)`` would run for inputs like ``r``."""
    return WKV7.resolve(backend, r)


def wkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7 WKV operator.

    ``r, w, k, v, a, b``: ``[B, T, H, N]``, one dtype (fp32, fp16 or bf16); ``w`` is the log
    decay (<= 0). Per head the fp32 state ``S`` (``[N_v, N_k]``: rows value dim, cols key dim) runs
    ``S_t = S_{t-1} diag(exp w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T`` and ``y_t = S_t r_t``
    (the model passes ``a = -kk``, ``b = kk * a_rate``). ``initial_state``: fp32
    ``[B, H, N, N]`` or None (zeros). Returns ``y`` ``[B, T, H, N]`` in the input dtype and the
    final state ``[B, H, N, N]`` fp32; differentiable in every input and through the final state.

    ``backend``: ``auto`` (the fastest exact backend for the device and dtype; ``torch`` on the
    CPU), ``torch`` (alias ``chunked``), ``reference`` (alias ``naive``), ``triton`` or ``fla``.
    ``chunk_size``: chunk length of the chunked backends (None: the backend's default; ignored
    by ``reference``).
    """
    check_inputs((r, w, k, v, a, b), initial_state)
    fn = WKV7.resolve(backend, r)
    B, T, H, N = r.shape
    if T == 0:
        state = r.new_zeros(B, H, N, N, dtype=torch.float32) if initial_state is None else initial_state.clone()
        return r.new_empty(r.shape), state
    y, state = fn(r, w, k, v, a, b, initial_state, chunk_size)
    return y.to(r.dtype), state


WKV7.register(REFERENCE, wkv7_naive, auto=lambda r: False)
WKV7.register(TORCH, wkv7_chunked)
