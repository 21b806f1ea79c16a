"""Triton kernels for the chunk selection: chunk-mean keys and the per-query top-(k-1) past chunks.

They reproduce ``selection.py`` (fp32 means, fp32 ``input_precision="ieee"`` scores, slots in
descending score order, equal scores to the lower chunk index, ``-1`` for unused slots) without its
``[rows, chunks]`` score buffer: each program keeps a running top list for a tile of queries while
it streams the chunk keys, so memory is the ``[B, Hq, Tq, top_k - 1]`` result only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_config import next_pow2, select_blocks


@triton.jit
def _chunk_mean_kernel(
    K, OUT,
    stride_kb, stride_kt, stride_kh,
    stride_ob, stride_on, stride_oh,
    Hkv, chunk,
    D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    rd = tl.arange(0, BD)
    rt = tl.arange(0, BT)
    base = K + b * stride_kb + h * stride_kh
    start = j.to(tl.int64) * chunk
    acc = tl.zeros([BD], dtype=tl.float32)
    for t0 in range(0, chunk, BT):
        t = t0 + rt
        ptr = base + (start + t.to(tl.int64))[:, None] * stride_kt + rd[None, :]
        x = tl.load(ptr, mask=(t[:, None] < chunk) & (rd[None, :] < D), other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    out = OUT + b * stride_ob + j.to(tl.int64) * stride_on + h * stride_oh + rd
    tl.store(out, acc / chunk, mask=rd < D)


@triton.jit
def _select_kernel(
    Q, CK, SEL,
    stride_qb, stride_qt, stride_qh,
    stride_cb, stride_cn, stride_ch,
    Tq, Hq, q_offset, chunk,
    G: tl.constexpr, S: tl.constexpr, SP: tl.constexpr,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, NCB: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    hq = bh % Hq
    kvh = (hq // G).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < Tq
    pos = q_offset + rows
    n_past = pos // chunk  # complete chunks before each query
    rd = tl.arange(0, BD)
    q_ptr = Q + b * stride_qb + hq.to(tl.int64) * stride_qh + rows.to(tl.int64)[:, None] * stride_qt + rd[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None] & (rd[None, :] < D), other=0.0).to(tl.float32)

    last_pos = tl.minimum(q_offset + pid_m * BM + BM, q_offset + Tq) - 1
    n_tile = last_pos // chunk
    cols = tl.arange(0, SP)
    jcols = tl.arange(0, NCB)
    best = tl.full([BM, SP], float("-inf"), tl.float32)
    best_idx = tl.full([BM, SP], -1, tl.int32)
    ck_base = CK + b * stride_cb + kvh * stride_ch
    for j0 in range(0, n_tile, NCB):
        jj = j0 + jcols
        ck = tl.load(
            ck_base + jj.to(tl.int64)[:, None] * stride_cn + rd[None, :],
            mask=(jj[:, None] < n_tile) & (rd[None, :] < D),
            other=0.0,
        )
        s = tl.dot(q, tl.trans(ck), input_precision="ieee")
        s = tl.where(jj[None, :] < n_past[:, None], s, float("-inf"))
        # Merge the running list with this block, best first. Every index in ``best`` is lower
        # than every index in the block, so an equal score keeps the running entry (lower index);
        # inside each, argmax's left tie-break picks the lower index.
        new_best = tl.full([BM, SP], float("-inf"), tl.float32)
        new_idx = tl.full([BM, SP], -1, tl.int32)
        for r in tl.static_range(S):
            b_max, b_arg = tl.max(best, axis=1, return_indices=True, return_indices_tie_break_left=True)
            n_max, n_arg = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
            from_block = b_max < n_max
            from_best = b_max >= n_max
            b_hit = cols[None, :] == b_arg[:, None]
            b_idx = tl.sum(tl.where(b_hit, best_idx, 0), axis=1)
            val = tl.where(from_block, n_max, b_max)
            idx = tl.where(from_block, j0 + n_arg, b_idx)
            new_best = tl.where(cols[None, :] == r, val[:, None], new_best)
            new_idx = tl.where(cols[None, :] == r, idx[:, None], new_idx)
            best = tl.where(b_hit & from_best[:, None], float("-inf"), best)
            s = tl.where((jcols[None, :] == n_arg[:, None]) & from_block[:, None], float("-inf"), s)
        best = new_best
        best_idx = new_idx
    # A query with n_past complete chunks fills exactly min(S, n_past) slots with finite scores.
    sel = tl.where(cols[None, :] < n_past[:, None], best_idx, -1)
    sel_row = ((b * Hq + hq) * Tq + rows.to(tl.int64)) * S
    tl.store(SEL + sel_row[:, None] + cols[None, :], sel, mask=row_ok[:, None] & (cols[None, :] < S))


def chunk_mean_keys_triton(k: torch.Tensor, chunk_size: int, num_chunks: int) -> torch.Tensor:
    """fp32 ``[B, num_chunks, Hkv, D]`` mean keys, as ``selection.chunk_mean_keys`` (no fp32 copy of k)."""
    b, t, h, d = k.shape
    if num_chunks * chunk_size > t:
        raise ValueError(
            f"asked for {num_chunks} chunk keys but k has only {t // chunk_size} complete chunks of "
            f"{chunk_size} (T={t})"
        )
    k = k.contiguous()
    out = torch.empty(b, num_chunks, h, d, device=k.device, dtype=torch.float32)
    if num_chunks == 0:
        return out
    bd = max(16, next_pow2(d))
    bt = 64
    _chunk_mean_kernel[(num_chunks, b * h)](
        k, out, k.stride(0), k.stride(1), k.stride(2), out.stride(0), out.stride(1), out.stride(2),
        h, chunk_size, D=d, BD=bd, BT=bt,
    )
    return out


def select_chunks_triton(
    q: torch.Tensor, chunk_keys: torch.Tensor, *, chunk_size: int, top_k: int, q_offset: int
) -> torch.Tensor:
    """``[B, Hq, Tq, top_k - 1]`` int32 selected past chunks, as ``selection.select_chunks``."""
    b, tq, hq, d = q.shape
    hkv = chunk_keys.shape[2]
    slots = top_k - 1
    sel = torch.full((b, hq, tq, slots), -1, dtype=torch.int32, device=q.device)
    n = (q_offset + tq - 1) // chunk_size if tq > 0 else 0
    if slots == 0 or n == 0:
        return sel
    if chunk_keys.shape[1] < n:
        raise ValueError(
            f"chunk_keys holds {chunk_keys.shape[1]} chunks but the last query can select among {n}"
        )
    q = q.contiguous()
    chunk_keys = chunk_keys.float().contiguous()
    bm, ncb, warps = select_blocks()
    grid = (triton.cdiv(tq, bm), b * hq)
    _select_kernel[grid](
        q, chunk_keys, sel,
        q.stride(0), q.stride(1), q.stride(2),
        chunk_keys.stride(0), chunk_keys.stride(1), chunk_keys.stride(2),
        tq, hq, q_offset, chunk_size,
        G=hq // hkv, S=slots, SP=max(2, next_pow2(slots)), D=d, BD=max(16, next_pow2(d)), BM=bm, NCB=ncb,
        num_warps=warps,
    )
    return sel
