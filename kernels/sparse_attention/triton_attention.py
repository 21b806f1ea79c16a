"""Flash-style Triton kernels of top-k chunk attention (forward and backward).

Work splits in two kinds, merged through each query's log-sum-exp (kept in base 2, ``lse2``):

- own chunk (query-centric): a tile of consecutive queries of one head streams the keys of its own
  chunk up to the tile's last query with an online softmax and a causal mask;
- selected past chunks (pair-centric, see ``triton_pairs.py``): a tile of (query, chunk) pairs that
  share one key chunk streams that chunk; its partial output and lse go to a ``[pairs, D]`` fp32
  buffer that the own-chunk kernel merges into the final output.

Backward recomputes the probabilities from the saved lse: one kernel per key block accumulates
dk, dv over the own-chunk queries and over every pair that selected the block's chunk, so dk, dv
are written once without atomics; dq of the pairs goes through a ``[pairs, D]`` buffer that the
own-chunk dq kernel adds. Nothing of size T x T or heads x chunks x T is ever built.

Index arithmetic that meets a stride is done in int64 so T of 128K and beyond is safe.

``T_BUCKET`` (the query length rounded up to a power of two) is read by no kernel: it is part of
the autotune key, so that block sizes tuned on a short call are not reused at 128K.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Finite start for the running maximum: a row whose first key block is fully masked keeps
# exp2(-inf - _M_INIT) = 0 instead of exp2(-inf + inf) = nan.
_M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _own_forward_kernel(
    Q, K, V, O, LSE, OP, LSEP, SEL,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    Tq, Hq, q_offset, chunk, qk_scale, T_BUCKET,
    G: tl.constexpr, S: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    hq = bh % Hq
    kvh = (hq // G).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < Tq
    pos = q_offset + rows
    chunk_start = (pos // chunk) * chunk
    rd = tl.arange(0, BD)
    d_ok = rd < D
    row_off = b * stride_qb + hq.to(tl.int64) * stride_qh + rows.to(tl.int64) * stride_qt
    q = tl.load(Q + row_off[:, None] + rd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    first = q_offset + pid_m * BM
    hi = tl.minimum(first + BM, q_offset + Tq)
    lo = (first // chunk) * chunk
    k_base = b * stride_kb + kvh * stride_kh
    m_i = tl.full([BM], _M_INIT, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    for start in range(lo, hi, BN):
        kpos = start + tl.arange(0, BN)
        kv_off = k_base + kpos.to(tl.int64)[:, None] * stride_kt + rd[None, :]
        kv_mask = (kpos < hi)[:, None] & d_ok[None, :]
        kb = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        vb = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(kb), input_precision=PREC) * qk_scale
        allowed = (kpos[None, :] >= chunk_start[:, None]) & (kpos[None, :] <= pos[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PREC)
        m_i = m_new
    lse = m_i + tl.log2(l_i)
    out = acc / l_i[:, None]
    if S > 0:
        # Merge the selected chunks' partial results (computed by _pair_forward_kernel).
        pair_row = ((b * Hq + hq) * Tq + rows.to(tl.int64)) * S
        total = tl.full([BM], 1.0, tl.float32)
        for r in tl.static_range(S):
            sel = tl.load(SEL + pair_row + r, mask=row_ok, other=-1)
            valid = sel >= 0
            lse_p = tl.load(LSEP + pair_row + r, mask=valid, other=float("-inf"))
            o_p = tl.load(
                OP + (pair_row + r)[:, None] * D + rd[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0
            )
            m_new = tl.maximum(lse, lse_p)
            a = tl.exp2(lse - m_new)
            w = tl.exp2(lse_p - m_new)
            out = out * a[:, None] + o_p * w[:, None]
            total = total * a + w
            lse = m_new
        out = out / total[:, None]
        lse = lse + tl.log2(total)
    tl.store(O + row_off[:, None] + rd[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b * Hq + hq) * Tq + rows, lse, mask=row_ok)


@triton.jit
def _pair_tile(g, PAIRS, TILE_START, OFFSETS, Tq, Hq, Hkv, n_past, S: tl.constexpr, BM: tl.constexpr):
    """This program's tile of (query, chunk) pairs of group ``g`` (see ``triton_pairs``): the key
    chunk ``j``, kv head and batch it shares, then per pair its validity, id, query position and
    query head."""
    g = g.to(tl.int64)
    start = tl.load(TILE_START + tl.program_id(0))
    end = tl.load(OFFSETS + g + 1)
    j = g % n_past
    kvh = (g // n_past) % Hkv
    b = g // n_past // Hkv
    idx = start + tl.arange(0, BM)
    ok = idx < end
    pair = tl.load(PAIRS + idx, mask=ok, other=0).to(tl.int64)
    return j, kvh, b, ok, pair, (pair // S) % Tq, (pair // S // Tq) % Hq


@triton.jit
def _pair_forward_kernel(
    Q, K, V, OP, LSEP, PAIRS, TILE_GROUP, TILE_START, OFFSETS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    Tq, Hq, Hkv, n_past, chunk, qk_scale, T_BUCKET,
    S: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    g = tl.load(TILE_GROUP + tl.program_id(0))
    if g < 0:  # a spare program of the upper-bound grid
        return
    j, kvh, b, ok, pair, t, hq = _pair_tile(g, PAIRS, TILE_START, OFFSETS, Tq, Hq, Hkv, n_past, S, BM)
    rd = tl.arange(0, BD)
    d_ok = rd < D
    row_off = b * stride_qb + hq * stride_qh + t * stride_qt
    q = tl.load(Q + row_off[:, None] + rd[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)

    k_base = b * stride_kb + kvh * stride_kh + j * chunk * stride_kt
    m_i = tl.full([BM], _M_INIT, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    for n0 in range(0, chunk, BN):
        kn = n0 + tl.arange(0, BN)
        kv_off = k_base + kn.to(tl.int64)[:, None] * stride_kt + rd[None, :]
        kv_mask = (kn < chunk)[:, None] & d_ok[None, :]
        kb = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        vb = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(kb), input_precision=PREC) * qk_scale
        s = tl.where((kn < chunk)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PREC)
        m_i = m_new
    tl.store(OP + pair[:, None] * D + rd[None, :], acc / l_i[:, None], mask=ok[:, None] & d_ok[None, :])
    tl.store(LSEP + pair, m_i + tl.log2(l_i), mask=ok)


@triton.jit
def _delta_kernel(
    O, DO, DELTA, stride_qb, stride_qt, stride_qh, Tq, Hq,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    hq = (bh % Hq).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < Tq
    rd = tl.arange(0, BD)
    off = b * stride_qb + hq * stride_qh + rows.to(tl.int64)[:, None] * stride_qt + rd[None, :]
    mask = row_ok[:, None] & (rd < D)[None, :]
    o = tl.load(O + off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + (b * Hq + hq) * Tq + rows, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, PAIRS, OFFSETS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    Tq, Hq, Hkv, q_offset, chunk, key_stop, n_past, qk_scale, scale, n_bh, T_BUCKET,
    G: tl.constexpr, S: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    # Program order: chunk by chunk; inside a chunk, head by head; inside a (chunk, head), its key
    # blocks one after another. The key blocks of one (chunk, head) read the same gathered pair
    # rows, so they run together and share them through L2; and the first chunks, which every
    # later query may select and so carry the most pairs, start first on every head.
    per_chunk = tl.maximum(chunk // BN, 1)
    pid = tl.program_id(0)
    group_id = pid // (n_bh * per_chunk)
    in_group = pid % (n_bh * per_chunk)
    bh = in_group // per_chunk
    pid_n = group_id * per_chunk + in_group % per_chunk
    if pid_n * BN >= key_stop:  # padding of the last group
        return
    b = (bh // Hkv).to(tl.int64)
    kvh = (bh % Hkv).to(tl.int64)
    first_key = pid_n * BN
    kpos = first_key + tl.arange(0, BN)
    k_ok = kpos < key_stop
    k_chunk = kpos // chunk
    rd = tl.arange(0, BD)
    d_ok = rd < D
    kv_off = b * stride_kb + kvh * stride_kh + kpos.to(tl.int64)[:, None] * stride_kt + rd[None, :]
    kv_mask = k_ok[:, None] & d_ok[None, :]
    kb = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    vb = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    last_key = tl.minimum(first_key + BN, key_stop) - 1

    # Own chunk: queries of the same chunk at or after the key, from every head of the group.
    q_lo = tl.maximum(first_key, q_offset)
    q_hi = tl.minimum((last_key // chunk + 1) * chunk, q_offset + Tq)
    for g in range(G):
        hq = kvh * G + g
        head_off = b * stride_qb + hq * stride_qh
        lse_base = (b * Hq + hq) * Tq - q_offset
        for q0 in range(q_lo, q_hi, BM):
            qpos = q0 + tl.arange(0, BM)
            q_ok = qpos < q_hi
            q_off = head_off + (qpos - q_offset).to(tl.int64)[:, None] * stride_qt + rd[None, :]
            q_mask = q_ok[:, None] & d_ok[None, :]
            qb = tl.load(Q + q_off, mask=q_mask, other=0.0)
            dob = tl.load(DO + q_off, mask=q_mask, other=0.0)
            lse = tl.load(LSE + lse_base + qpos, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + lse_base + qpos, mask=q_ok, other=0.0)
            s_t = tl.dot(kb, tl.trans(qb), input_precision=PREC) * qk_scale
            allowed = (
                (qpos[None, :] >= kpos[:, None])
                & ((qpos // chunk)[None, :] == k_chunk[:, None])
                & q_ok[None, :]
                & k_ok[:, None]
            )
            p_t = tl.where(allowed, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(dob.dtype), dob, input_precision=PREC)
            dp_t = tl.dot(vb, tl.trans(dob), input_precision=PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(qb.dtype), qb, input_precision=PREC)

    if S > 0:
        # Selected past chunks: every pair of group (b, kv head, chunk) that chose a key here. A
        # block straddles at most two chunks when BN does not divide the chunk size.
        c_first = first_key // chunk
        c_last = tl.minimum(last_key // chunk, n_past - 1)
        for c in range(c_first, c_last + 1):
            grp = (b * Hkv + kvh) * n_past + c
            p_lo = tl.load(OFFSETS + grp)
            p_hi = tl.load(OFFSETS + grp + 1)
            in_chunk = k_ok & (k_chunk == c)
            for i0 in range(p_lo, p_hi, BM):
                idx = i0 + tl.arange(0, BM)
                ok = idx < p_hi
                pair = tl.load(PAIRS + idx, mask=ok, other=0).to(tl.int64)
                t = (pair // S) % Tq
                hq = (pair // S // Tq) % Hq
                q_off = b * stride_qb + hq * stride_qh + t * stride_qt
                q_mask = ok[:, None] & d_ok[None, :]
                qb = tl.load(Q + q_off[:, None] + rd[None, :], mask=q_mask, other=0.0)
                dob = tl.load(DO + q_off[:, None] + rd[None, :], mask=q_mask, other=0.0)
                lse_idx = (b * Hq + hq) * Tq + t
                lse = tl.load(LSE + lse_idx, mask=ok, other=0.0)
                delta = tl.load(DELTA + lse_idx, mask=ok, other=0.0)
                s_t = tl.dot(kb, tl.trans(qb), input_precision=PREC) * qk_scale
                p_t = tl.where(in_chunk[:, None] & ok[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
                dv += tl.dot(p_t.to(dob.dtype), dob, input_precision=PREC)
                dp_t = tl.dot(vb, tl.trans(dob), input_precision=PREC)
                ds_t = p_t * (dp_t - delta[None, :])
                dk += tl.dot(ds_t.to(qb.dtype), qb, input_precision=PREC)

    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _pair_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQP, PAIRS, TILE_GROUP, TILE_START, OFFSETS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    Tq, Hq, Hkv, n_past, chunk, qk_scale, scale, T_BUCKET,
    S: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    g = tl.load(TILE_GROUP + tl.program_id(0))
    if g < 0:  # a spare program of the upper-bound grid
        return
    j, kvh, b, ok, pair, t, hq = _pair_tile(g, PAIRS, TILE_START, OFFSETS, Tq, Hq, Hkv, n_past, S, BM)
    rd = tl.arange(0, BD)
    d_ok = rd < D
    row_off = b * stride_qb + hq * stride_qh + t * stride_qt
    q_mask = ok[:, None] & d_ok[None, :]
    q = tl.load(Q + row_off[:, None] + rd[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + row_off[:, None] + rd[None, :], mask=q_mask, other=0.0)
    lse_idx = (b * Hq + hq) * Tq + t
    lse = tl.load(LSE + lse_idx, mask=ok, other=0.0)
    delta = tl.load(DELTA + lse_idx, mask=ok, other=0.0)

    k_base = b * stride_kb + kvh * stride_kh + j * chunk * stride_kt
    dq = tl.zeros([BM, BD], tl.float32)
    for n0 in range(0, chunk, BN):
        kn = n0 + tl.arange(0, BN)
        kv_off = k_base + kn.to(tl.int64)[:, None] * stride_kt + rd[None, :]
        kv_mask = (kn < chunk)[:, None] & d_ok[None, :]
        kb = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        vb = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(kb), input_precision=PREC) * qk_scale
        p = tl.where((kn < chunk)[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vb), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kb.dtype), kb, input_precision=PREC)
    tl.store(DQP + pair[:, None] * D + rd[None, :], dq * scale, mask=q_mask)


@triton.jit
def _own_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DQP, SEL,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    Tq, Hq, q_offset, chunk, qk_scale, scale, T_BUCKET,
    G: tl.constexpr, S: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    hq = bh % Hq
    kvh = (hq // G).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < Tq
    pos = q_offset + rows
    chunk_start = (pos // chunk) * chunk
    rd = tl.arange(0, BD)
    d_ok = rd < D
    row_off = b * stride_qb + hq.to(tl.int64) * stride_qh + rows.to(tl.int64) * stride_qt
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + row_off[:, None] + rd[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + row_off[:, None] + rd[None, :], mask=q_mask, other=0.0)
    lse_idx = (b * Hq + hq) * Tq + rows
    lse = tl.load(LSE + lse_idx, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + lse_idx, mask=row_ok, other=0.0)

    first = q_offset + pid_m * BM
    hi = tl.minimum(first + BM, q_offset + Tq)
    lo = (first // chunk) * chunk
    k_base = b * stride_kb + kvh * stride_kh
    dq = tl.zeros([BM, BD], tl.float32)
    for start in range(lo, hi, BN):
        kpos = start + tl.arange(0, BN)
        kv_off = k_base + kpos.to(tl.int64)[:, None] * stride_kt + rd[None, :]
        kv_mask = (kpos < hi)[:, None] & d_ok[None, :]
        kb = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        vb = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(kb), input_precision=PREC) * qk_scale
        allowed = (kpos[None, :] >= chunk_start[:, None]) & (kpos[None, :] <= pos[:, None])
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vb), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kb.dtype), kb, input_precision=PREC)
    dq = dq * scale
    if S > 0:
        pair_row = ((b * Hq + hq) * Tq + rows.to(tl.int64)) * S
        for r in tl.static_range(S):
            sel = tl.load(SEL + pair_row + r, mask=row_ok, other=-1)
            valid = sel >= 0
            dq += tl.load(
                DQP + (pair_row + r)[:, None] * D + rd[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0
            )
    tl.store(DQ + row_off[:, None] + rd[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)
