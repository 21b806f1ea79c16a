"""Operators of megatron-rwkvx (installed as ``megatron_rwkvx.kernels``).

Each operator has a naive PyTorch reference, an efficient PyTorch implementation (the CPU default
and the GPU fallback) and, where written, a Triton kernel; all share one interface.
"""
