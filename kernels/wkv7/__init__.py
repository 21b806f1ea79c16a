"""RWKV-7 WKV operator: one interface (``wkv7``), several backends.

``reference`` (token loop, the numerical definition; old name ``naive``), ``torch`` (pure
PyTorch, chunked with matrix products: the CPU default and GPU fallback; old name ``chunked``),
``triton`` (``triton_backend.py``) and ``fla`` (when flash-linear-attention is installed); the
registry and ``auto`` live in ``kernels/registry.py``.
"""
from .chunked import DEFAULT_CHUNK_SIZE, wkv7_chunked
from .dispatch import WKV7, available_backends, register_backend, resolve_backend, wkv7
from .naive import wkv7_naive

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "WKV7",
    "available_backends",
    "register_backend",
    "resolve_backend",
    "wkv7",
    "wkv7_chunked",
    "wkv7_naive",
]
