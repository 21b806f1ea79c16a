"""The short forward+backward that ``auto`` times and checks for top-k chunk attention."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..registry import ProbeCase
from .selection import MEAN_SELECTION


def _forward_backward(call: dict) -> Callable:
    def run(fn: Callable, inputs: Sequence[torch.Tensor]):
        q, k, v = (t.detach().clone().requires_grad_(True) for t in inputs)
        out = fn(q, k, v, **call)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return [out.float(), *grads]
    return run


def probe_case(q: torch.Tensor, call: dict) -> ProbeCase:
    """One sequence of ``top_k + 1`` chunks (so that every query beyond the first ``top_k``
    chunks has a real choice to make) with the call's heads, kv heads and head size."""
    chunk, top_k = call["chunk_size"], call["top_k"]
    hq, d = q.shape[2], q.shape[3]
    hkv = call.get("kv_heads", hq)
    T = chunk * (top_k + 1)
    gen = torch.Generator(device=q.device).manual_seed(4321)
    shapes = ((1, T, hq, d), (1, T, hkv, d), (1, T, hkv, d))
    inputs = [torch.randn(*s, generator=gen, device=q.device).to(q.dtype) for s in shapes]
    options = dict(chunk_size=chunk, top_k=top_k, scale=call["scale"], q_offset=0,
                   selection=call.get("selection", MEAN_SELECTION))
    return ProbeCase(inputs=inputs, run=_forward_backward(options),
                     shape=f"B=1 T={T} Hq={hq} Hkv={hkv} D={d} chunk={chunk} top_k={top_k}")
