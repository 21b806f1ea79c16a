"""RWKV-7 WKV operator: one interface (``wkv7``), several backends.

``naive`` (token loop, the numerical reference), ``chunked`` (pure PyTorch, chunked with matrix
products: the CPU default and GPU fallback), ``fla`` (when flash-linear-attention is installed)
and ``triton`` (``triton_backend.py`` registers itself through ``register_backend``).
"""
from .chunked import DEFAULT_CHUNK_SIZE, wkv7_chunked
from .dispatch import available_backends, register_backend, resolve_backend, wkv7
from .naive import wkv7_naive

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "available_backends",
    "register_backend",
    "resolve_backend",
    "wkv7",
    "wkv7_chunked",
    "wkv7_naive",
]
