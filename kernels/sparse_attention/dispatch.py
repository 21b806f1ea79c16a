"""Backend registry and the public entry point ``topk_chunk_attention``.

Built in: ``reference`` (dense, tests only) and ``torch`` (chunked, any device). A Triton kernel
plugs in without edits here: any module of this package whose name starts with ``triton`` is
imported on the first request for a backend not yet registered, and registers itself with
``register_backend(name, fn, is_available)``. ``fn`` is called with validated tensors as
``fn(q, k, v, chunk_size=, top_k=, scale=<float>, q_offset=)`` and must honour the selection of
``selection.py``.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Dict, Optional, Tuple

import torch

from .checks import check_inputs
from .chunked import topk_chunk_attention_torch
from .reference import topk_chunk_attention_reference

Backend = Callable[..., torch.Tensor]

_REGISTRY: Dict[str, Tuple[Backend, Callable[[torch.Tensor], bool]]] = {}
# Import failures of plug-in modules, reported when their backend is asked for.
_PLUGIN_ERRORS: Dict[str, str] = {}
_plugins_loaded = False


def register_backend(
    name: str, fn: Backend, is_available: Optional[Callable[[torch.Tensor], bool]] = None
) -> None:
    """Register ``fn`` as backend ``name``; ``is_available(q)`` says whether it can run on q's device."""
    _REGISTRY[name] = (fn, is_available or (lambda q: True))


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for info in pkgutil.iter_modules(_package_path()):
        if info.name.startswith("triton"):
            try:
                importlib.import_module(f"{__package__}.{info.name}")
            except Exception as exc:  # a broken optional kernel must not break the torch path
                _PLUGIN_ERRORS[info.name] = f"{type(exc).__name__}: {exc}"


def _package_path():
    package = importlib.import_module(__package__)
    return list(package.__path__)


def available_backends(q: Optional[torch.Tensor] = None) -> list:
    """Registered backend names (those that can run on q's device when q is given)."""
    _load_plugins()
    return sorted(n for n, (_, ok) in _REGISTRY.items() if q is None or ok(q))


def _resolve(backend: str, q: torch.Tensor) -> Backend:
    if backend == "auto":
        if q.is_cuda:
            _load_plugins()
            if "triton" in _REGISTRY and _REGISTRY["triton"][1](q):
                return _REGISTRY["triton"][0]
        return _REGISTRY["torch"][0]
    if backend not in _REGISTRY:
        _load_plugins()
    if backend not in _REGISTRY:
        known = sorted(set(_REGISTRY) | {"auto"})
        hint = ""
        if _PLUGIN_ERRORS:
            hint = "; plug-in modules failed to import: " + "; ".join(
                f"{m}: {e}" for m, e in sorted(_PLUGIN_ERRORS.items())
            )
        raise ValueError(f"unknown sparse-attention backend {backend!r}; choose one of {known}{hint}")
    fn, ok = _REGISTRY[backend]
    if not ok(q):
        raise RuntimeError(
            f"sparse-attention backend {backend!r} cannot run on device {q.device}; use "
            "backend='torch' (or 'auto', which falls back to it)"
        )
    return fn


def topk_chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int = 2048,
    top_k: int = 3,
    scale: Optional[float] = None,
    q_offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Top-k chunk sparse attention (RWKV-X / MoBA semantics).

    q ``[B, Tq, Hq, D]`` holds positions ``q_offset .. q_offset + Tq - 1``; k, v ``[B, Tk, Hkv, D]``
    hold positions ``0 .. Tk - 1`` with ``Tk >= q_offset + Tq`` (later keys are ignored);
    ``Hq % Hkv == 0`` and query head h uses kv head ``h // (Hq // Hkv)``. Each query attends
    causally to its own chunk of ``chunk_size`` keys and fully to the ``top_k - 1`` complete past
    chunks whose mean key scores highest against it (no gradient through this choice), with one
    softmax of scale ``scale`` (default ``1/sqrt(D)``). Returns ``[B, Tq, Hq, D]`` in q's dtype.
    ``backend``: ``auto`` (Triton on CUDA when registered, else ``torch``), ``torch``,
    ``reference`` or a registered plug-in such as ``triton``.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    scale = check_inputs(q, k, v, chunk_size=chunk_size, top_k=top_k, scale=scale, q_offset=q_offset)
    fn = _resolve(backend, q)
    if q.shape[1] == 0:
        return q.new_empty(q.shape)
    return fn(q, k, v, chunk_size=chunk_size, top_k=top_k, scale=scale, q_offset=q_offset)


register_backend("reference", topk_chunk_attention_reference)
register_backend("torch", topk_chunk_attention_torch)
