"""Backend registry and the public entry point ``wkv7``.

Built in: ``naive`` (token loop, the reference), ``chunked`` (pure PyTorch, any device) and
``fla`` (when flash-linear-attention imports). The Triton kernel plugs in without edits here:
the first request for ``triton`` (or ``auto`` on CUDA) imports
``megatron_rwkvx.kernels.wkv7.triton_backend``, which must call
``register_backend("triton", fn, is_available)``. ``fn`` is called as
``fn(r, w, k, v, a, b, initial_state, chunk_size)`` with validated inputs (``[B, T, H, N]``, one
dtype, ``initial_state`` fp32 ``[B, H, N, N]`` or None, ``T >= 1``) and returns ``(y, final_state)``:
y ``[B, T, H, N]`` in any float dtype (cast to the input dtype here), final_state fp32.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional, Tuple

import torch

from .checks import check_inputs
from .chunked import wkv7_chunked
from .fla_backend import fla_import_error, wkv7_fla
from .naive import wkv7_naive

Backend = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
Availability = Callable[[torch.Tensor], bool]

TRITON_MODULE = f"{__package__}.triton_backend"

_REGISTRY: Dict[str, Tuple[Backend, Availability]] = {}
_triton_import_error: Optional[str] = None
_triton_tried = False
_fla_tried = False


def register_backend(name: str, fn: Backend, is_available: Optional[Availability] = None) -> None:
    """Register ``fn`` as backend ``name``; ``is_available(r)`` says whether it can run on r's device."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"wkv7: invalid backend name {name!r}")
    _REGISTRY[name] = (fn, is_available or (lambda r: True))


def _load_triton() -> None:
    global _triton_tried, _triton_import_error
    if _triton_tried:
        return
    _triton_tried = True
    try:
        importlib.import_module(TRITON_MODULE)
    except ModuleNotFoundError as exc:
        _triton_import_error = (
            "not written yet" if exc.name == TRITON_MODULE else f"ModuleNotFoundError: {exc}"
        )
        return
    except Exception as exc:  # a broken optional kernel must not break the PyTorch paths
        _triton_import_error = f"{type(exc).__name__}: {exc}"
        return
    if "triton" not in _REGISTRY:
        _triton_import_error = f"{TRITON_MODULE} imported but did not call register_backend('triton', ...)"


def _load_fla() -> None:
    # Lazy: importing fla pulls in its Triton kernels, which a CPU run never needs.
    global _fla_tried
    if not _fla_tried:
        _fla_tried = True
        if fla_import_error() is None:
            register_backend("fla", wkv7_fla, lambda r: r.is_cuda)


def available_backends(r: Optional[torch.Tensor] = None) -> list:
    """Registered backend names (those that can run on r's device when r is given)."""
    _load_triton()
    _load_fla()
    return sorted(n for n, (_, ok) in _REGISTRY.items() if r is None or ok(r))


def _unknown(backend: str) -> ValueError:
    known = sorted(set(_REGISTRY) | {"auto"})
    return ValueError(f"wkv7: unknown backend {backend!r}; choose one of {known}")


def resolve_backend(backend: str, r: torch.Tensor) -> Backend:
    """The function that ``wkv7(..., backend=backend)`` would run for inputs like ``r``."""
    if not isinstance(backend, str):
        raise TypeError(f"wkv7: backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        if r.is_cuda:
            _load_triton()
            if "triton" in _REGISTRY and _REGISTRY["triton"][1](r):
                return _REGISTRY["triton"][0]
        return _REGISTRY["chunked"][0]
    if backend == "triton":
        _load_triton()
        if "triton" not in _REGISTRY:
            raise RuntimeError(
                f"wkv7: backend 'triton' is unavailable ({_triton_import_error}); available: "
                f"{available_backends(r)} (or 'auto', which falls back to 'chunked')"
            )
    if backend == "fla":
        _load_fla()
    if backend == "fla" and "fla" not in _REGISTRY:
        raise RuntimeError(
            f"wkv7: backend 'fla' is not installed ({fla_import_error()}); "
            "pip install flash-linear-attention, or use one of "
            f"{available_backends(r)}"
        )
    if backend not in _REGISTRY:
        raise _unknown(backend)
    fn, ok = _REGISTRY[backend]
    if not ok(r):
        raise RuntimeError(
            f"wkv7: backend {backend!r} cannot run on device {r.device}; backends that can: "
            f"{available_backends(r)} (or 'auto')"
        )
    return fn


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

    ``backend``: ``auto`` (``triton`` on CUDA when registered and importable, else ``chunked``),
    ``chunked``, ``naive``, ``triton`` or ``fla``. ``chunk_size``: chunk length of the chunked
    backends (None: the backend's default; ignored by ``naive``).
    """
    check_inputs((r, w, k, v, a, b), initial_state)
    fn = resolve_backend(backend, r)
    B, T, H, N = r.shape
    if T == 0:
        state = r.new_zeros(B, H, N, N, dtype=torch.float32) if initial_state is None else initial_state.clone()
        return r.new_empty(r.shape), state
    y, state = fn(r, w, k, v, a, b, initial_state, chunk_size)
    return y.to(r.dtype), state


register_backend("naive", wkv7_naive)
register_backend("chunked", wkv7_chunked)
