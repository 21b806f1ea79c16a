"""Triton backend of top-k chunk attention: registers ``triton`` with the operator's registry.

``topk_chunk_attention(..., backend="triton")`` (or ``"auto"`` on CUDA) lands here. It runs on
CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported
(the interpreter; used by the tests). Inputs fp32, fp16 or bf16; fp32 uses true fp32 dot products
(``input_precision="ieee"``), the others accumulate in fp32 like flash attention.

Block sizes: autotuned on the GPU for bf16/fp16, fixed otherwise (``triton_config``). No host
synchronisation: the pair kernels run on an upper bound of the tile count (``triton_pairs``).

Memory besides q, k, v, out and their gradients: the selection ``[B, Hq, Tq, top_k - 1]`` (int32),
its sorted pair list, fp32 lse and delta ``[B, Hq, Tq]``, and one fp32 ``[B*Hq*Tq*(top_k-1), D]``
buffer for the selected chunks' partial outputs (forward) or partial dq (backward), which is
2 * (top_k - 1) times the size of a bf16 q.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from .dispatch import register_backend
from .triton_attention import (
    _delta_kernel,
    _dkdv_kernel,
    _own_dq_kernel,
    _own_forward_kernel,
    _pair_dq_kernel,
    _pair_forward_kernel,
)
from ..triton_launch import autotuned, launch
from .triton_config import INTERPRETED, blocks_for, fixed_configs, next_pow2, tuned_configs
from .triton_pairs import PairGroups, group_pairs
from .selection import MEAN_SELECTION, chunk_selection_keys, check_selection, selection_queries
from .triton_select import chunk_mean_keys_triton, select_chunks_triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256
_RAW = {
    "own_forward": _own_forward_kernel,
    "pair_forward": _pair_forward_kernel,
    "dkdv": _dkdv_kernel,
    "pair_dq": _pair_dq_kernel,
    "own_dq": _own_dq_kernel,
}
_TUNE_KEY = ["D", "S", "G", "BM", "chunk", "T_BUCKET"]  # BM: the pair tile of the pair kernels
_tuned_cache: dict = {}


def _tuned(name: str, bd: int):
    """The autotuned kernel ``name`` at padded head size ``bd``, or None (no set for it)."""
    if (name, bd) not in _tuned_cache:
        sets = tuned_configs(bd)
        key = [k for k in _TUNE_KEY if k in _RAW[name].arg_names]
        _tuned_cache[name, bd] = autotuned(_RAW[name], sets[name], key) if sets else None
    return _tuned_cache[name, bd]


class _Launcher:
    """Launches of one call: autotuned for bf16/fp16 on a GPU (where a set exists for the head
    size), the fixed blocks otherwise (``kernels/triton_launch.py``)."""

    def __init__(self, q: torch.Tensor, tq: int):
        d = q.shape[-1]
        self.bd = max(16, next_pow2(d))
        self.blocks = blocks_for(d, q.element_size())
        self.fixed = fixed_configs(self.blocks)
        self.tune = q.dtype != torch.float32 and tuned_configs(self.bd) is not None
        self.t_bucket = max(16, next_pow2(tq))

    def __call__(self, name: str, grid, args, **meta):
        launch(_tuned(name, self.bd) if self.tune else None, _RAW[name], grid, args, self.fixed[name], **meta)


def is_available(q: torch.Tensor) -> bool:
    """Whether the kernels can run on ``q``'s device: CUDA, or the CPU when the kernels were
    defined under the interpreter."""
    if q.is_cuda:
        return not INTERPRETED
    return q.device.type == "cpu" and INTERPRETED


def _precision(dtype: torch.dtype) -> str:
    # tf32 would change fp32 results at the 1e-3 level; half types ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(q: torch.Tensor, k: torch.Tensor):
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))


def _dkdv_programs(key_stop: int, chunk: int, block_n: int) -> int:
    """dk/dv programs per (batch, kv head): the key blocks, padded to whole groups of the blocks
    of one chunk (the kernel's program order; padding programs exit)."""
    per_chunk = max(chunk // block_n, 1)
    return triton.cdiv(triton.cdiv(key_stop, block_n), per_chunk) * per_chunk


class _TritonTopkChunkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, selected, chunk_size, scale, q_offset, pair_tile):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, tq, hq, d = q.shape
        hkv = k.shape[2]
        run = _Launcher(q, tq)
        bd = run.bd
        tile = pair_tile or run.blocks.m
        n_past = (q_offset + tq - 1) // chunk_size
        slots = selected.shape[-1] if n_past > 0 else 0
        qk_scale = scale * math.log2(math.e)
        prec = _precision(q.dtype)

        out = torch.empty_like(q)
        lse = torch.empty(b, hq, tq, device=q.device, dtype=torch.float32)
        groups: Optional[PairGroups] = None
        o_pair = lse_pair = lse  # placeholders never read when slots == 0
        if slots > 0:
            selected = selected.to(torch.int32).contiguous()
            groups = group_pairs(selected, hkv, n_past, tile)
            n_pairs = selected.numel()
            o_pair = torch.empty(n_pairs, d, device=q.device, dtype=torch.float32)
            lse_pair = torch.empty(n_pairs, device=q.device, dtype=torch.float32)
            if groups.max_tiles > 0:
                run("pair_forward", (groups.max_tiles,), (
                    q, k, v, o_pair, lse_pair, groups.pairs, groups.tile_group, groups.tile_start,
                    groups.offsets, *_strides(q, k), tq, hq, hkv, n_past, chunk_size, qk_scale,
                    run.t_bucket,
                ), S=slots, D=d, BD=bd, BM=tile, PREC=prec)
        else:
            selected = lse
        run("own_forward", lambda meta: (triton.cdiv(tq, meta["BM"]), b * hq), (
            q, k, v, out, lse, o_pair, lse_pair, selected, *_strides(q, k),
            tq, hq, q_offset, chunk_size, qk_scale, run.t_bucket,
        ), G=hq // hkv, S=slots, D=d, BD=bd, PREC=prec)
        pair_tensors = groups.tensors() if groups is not None else ()
        ctx.save_for_backward(q, k, v, out, lse, selected, *pair_tensors)
        ctx.groups = groups
        ctx.meta = (chunk_size, scale, q_offset, slots, n_past)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, selected, *pair_tensors = ctx.saved_tensors
        chunk_size, scale, q_offset, slots, n_past = ctx.meta
        groups: Optional[PairGroups] = ctx.groups
        b, tq, hq, d = q.shape
        tk, hkv = k.shape[1], k.shape[2]
        run = _Launcher(q, tq)
        bd = run.bd
        qk_scale = scale * math.log2(math.e)
        prec = _precision(q.dtype)
        do = grad_out.contiguous()
        if groups is not None:
            pairs, offsets, tile_group, tile_start = pair_tensors
        else:
            pairs = offsets = tile_group = tile_start = lse

        delta = torch.empty_like(lse)
        delta_m = 64
        _delta_kernel[(triton.cdiv(tq, delta_m), b * hq)](
            out, do, delta, q.stride(0), q.stride(1), q.stride(2), tq, hq,
            D=d, BD=bd, BM=delta_m, num_warps=4,
        )

        key_stop = q_offset + tq  # later keys are never attended: zero gradient
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        if key_stop < tk:
            dk[:, key_stop:].zero_()
            dv[:, key_stop:].zero_()
        run("dkdv", lambda meta: (_dkdv_programs(key_stop, chunk_size, meta["BN"]) * b * hkv,), (
            q, k, v, do, lse, delta, dk, dv, pairs, offsets, *_strides(q, k),
            tq, hq, hkv, q_offset, chunk_size, key_stop, max(n_past, 1), qk_scale, scale,
            b * hkv, run.t_bucket,
        ), G=hq // hkv, S=slots, D=d, BD=bd, PREC=prec)

        dq_pair = lse
        if groups is not None:
            dq_pair = torch.empty(selected.numel(), d, device=q.device, dtype=torch.float32)
            if groups.max_tiles > 0:
                run("pair_dq", (groups.max_tiles,), (
                    q, k, v, do, lse, delta, dq_pair, pairs, tile_group, tile_start, offsets,
                    *_strides(q, k), tq, hq, hkv, n_past, chunk_size, qk_scale, scale, run.t_bucket,
                ), S=slots, D=d, BD=bd, BM=groups.tile, PREC=prec)
        dq = torch.empty_like(q)
        run("own_dq", lambda meta: (triton.cdiv(tq, meta["BM"]), b * hq), (
            q, k, v, do, lse, delta, dq, dq_pair, selected, *_strides(q, k),
            tq, hq, q_offset, chunk_size, qk_scale, scale, run.t_bucket,
        ), G=hq // hkv, S=slots, D=d, BD=bd, PREC=prec)
        return dq, dk, dv, None, None, None, None, None


def _check_selected(selected: torch.Tensor, q: torch.Tensor, top_k: int, chunk_size: int, q_offset: int):
    b, tq, hq, _ = q.shape
    expected = (b, hq, tq, top_k - 1)
    if tuple(selected.shape) != expected:
        raise ValueError(
            f"selected must have shape [B, Hq, Tq, top_k - 1] = {expected}, got {tuple(selected.shape)}; "
            "build it with select_chunks/topk_chunk_selection"
        )
    if selected.dtype not in (torch.int32, torch.int64) or selected.device != q.device:
        raise TypeError(f"selected must be an int32/int64 tensor on {q.device}, got {selected.dtype} on {selected.device}")
    if selected.numel():
        own_chunk = (q_offset + torch.arange(tq, device=q.device)) // chunk_size
        bad = (selected < -1) | (selected >= own_chunk.view(1, 1, tq, 1))
        if bool(bad.any()):
            raise ValueError(
                "selected holds chunk ids outside [-1, own chunk): a query may select only complete "
                "past chunks (-1 for an unused slot)"
            )


def topk_chunk_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int,
    top_k: int,
    scale: Optional[float] = None,
    q_offset: int = 0,
    selected: Optional[torch.Tensor] = None,
    pair_tile: Optional[int] = None,
    selection: str = MEAN_SELECTION,
) -> torch.Tensor:
    """Triton top-k chunk attention; same contract as ``topk_chunk_attention`` (validated there).

    ``selected`` ``[B, Hq, Tq, top_k - 1]`` may be passed when the caller already has the
    selection (context parallelism with all-gathered chunk keys); by default it is computed by
    the Triton selection kernels, reproducing ``selection.py`` (``selection="quest"``: the chunks'
    key maxima and minima come from PyTorch, ``selection.chunk_selection_keys``, and the Triton
    kernel scores them). ``pair_tile`` (a power of two
    >= 16; default: the forward's query tile) sets how many (query, chunk) pairs share one
    streaming of a key chunk: larger tiles load each chunk fewer times but waste up to a tile per
    (kv head, chunk) group.
    """
    if pair_tile is not None and (
        isinstance(pair_tile, bool) or not isinstance(pair_tile, int) or pair_tile < 16 or pair_tile & (pair_tile - 1)
    ):
        raise ValueError(f"pair_tile must be a power of two >= 16 (or None), got {pair_tile!r}")
    if not is_available(q):
        raise RuntimeError(
            f"the triton sparse-attention backend needs CUDA tensors (or CPU tensors when "
            f"TRITON_INTERPRET=1 was set before the kernels were imported), got a tensor on "
            f"{q.device} (interpreter {'on' if INTERPRETED else 'off'}); use backend='torch'"
        )
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"the triton backend needs q, k, v of one dtype among fp32/fp16/bf16, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}; cast them to one dtype"
        )
    d = q.shape[-1]
    if d > _MAX_HEAD_DIM:
        raise ValueError(f"the triton backend supports head_dim <= {_MAX_HEAD_DIM}, got {d}; use backend='torch'")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    tq = q.shape[1]
    if tq == 0:
        return q.new_empty(q.shape)
    if selected is None:
        n_past = (q_offset + tq - 1) // chunk_size
        with torch.no_grad():
            if top_k > 1 and n_past > 0:
                if check_selection(selection) == MEAN_SELECTION:
                    keys, queries = chunk_mean_keys_triton(k.detach(), chunk_size, n_past), q.detach()
                else:
                    keys = chunk_selection_keys(k.detach(), chunk_size, n_past, selection)
                    queries = selection_queries(q.detach(), selection)
                selected = select_chunks_triton(
                    queries, keys, chunk_size=chunk_size, top_k=top_k, q_offset=q_offset
                )
            else:
                selected = torch.full((q.shape[0], q.shape[2], tq, top_k - 1), -1, dtype=torch.int32, device=q.device)
    else:
        _check_selected(selected, q, top_k, chunk_size, q_offset)
    return _TritonTopkChunkAttention.apply(q, k, v, selected, chunk_size, float(scale), q_offset, pair_tile)


# ``auto`` takes it on CUDA only: under the interpreter it is a test path, far slower than torch.
register_backend("triton", topk_chunk_attention_triton, is_available, auto=lambda q: q.is_cuda)
