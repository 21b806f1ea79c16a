"""Triton kernels of the chunked RWKV-7 recurrence (driven by ``triton_backend.py``).

Notation per head and chunk of ``L`` tokens (rows t = 0..L-1), state ``S`` ``[N_v, N_k]``:
``g`` = inclusive cumulative log-decay inside the chunk, ``gm = g - w`` the exclusive one,
``gL`` = ``g`` of the last row, ``S0`` the state entering the chunk.

* pair matrices, per channel and therefore exact whatever the decay:
  ``A_ab[t, j] = sum_c a_t b_j exp(gm_t - g_j)`` (j < t), ``A_ak`` likewise with k,
  ``A_rb[t, j] = sum_c r_t b_j exp(g_t - g_j)`` (j <= t), ``A_rk`` likewise with k;
* ``u_t = S_{t-1} a_t`` solves ``U = A_ab U + A_ak V + (a e^gm) S0^T``; with
  ``Tinv = (I - A_ab)^-1`` this is ``U = P + Q S0^T``, ``Q = Tinv (a e^gm)``, ``P = Tinv A_ak V``;
* outputs ``Y = R' S0^T + Y_loc``, ``R' = r e^g + A_rb Q``, ``Y_loc = A_rb P + A_rk V``;
* end state ``S_L = S0 diag(e^gL) + U^T B^ + V^T K^`` with ``B^ = b e^(gL - g)`` and
  ``K^ = k e^(gL - g)``.

Two ways to form the pair matrices (``FACTORED``):

* exact (any ``w <= 0``): per key column ``j``, every exponent is a difference ``later - earlier``
  of cumulative log-decays (<= 0), masked to -inf before ``exp`` where a pair is not causal, so
  nothing overflows; ``L`` steps of elementwise work on ``[L, N]`` tiles;
* factored (bounded decay): ``exp(gm_t - g_j) = e^(gm_t) e^(-gL) * e^(gL - g_j)``, so each matrix
  is one tensor-core product of tiles the chunk needs anyway (``a e^gm``, ``r e^g``, ``B^``,
  ``K^``), the query side rescaled by ``e^-gL``, masked afterwards; the backward pass gets the
  gradients through them from eight more products rescaled likewise. The rescale reaches
  ``e^(L max|w|)``, so the backend takes this path only when that stays far from fp32's range
  (``checks.FACTOR_EXPONENT_LIMIT``); RWKV-7's parametrisation keeps ``|w| <= e^-0.5``,
  i.e. at most ~39 even for 64-token chunks.

Kernels: ``prep`` (parallel over chunks: everything above that does not need ``S0``),
``fwd_scan`` (sequential over chunks, parallel over heads and value-row blocks: the rows of ``S``
evolve independently), ``bwd_scans`` (the state pass again, storing the chunk-entry states, side
by side with the state-gradient pass) and ``bwd_chunk`` (parallel over chunks: every input
gradient from ``S0``, ``dS_L``, ``dY`` and the pair matrices).

Gradient of one chunk (``dU``, ``dX`` with ``X = A_ak V + (a e^gm) S0^T``, ``U = Tinv X``):
``dU = A_rb^T dY + B^ dS_L^T``, ``dX = Tinv^T dU``, ``dA_ab = (dX U^T)`` strictly lower,
``dA_ak = (dX V^T)`` strictly lower, ``dA_rb = (dY U^T)``, ``dA_rk = (dY V^T)`` lower,
``dV = A_ak^T dX + A_rk^T dY + K^ dS_L^T``, ``d(a e^gm) = dX S0``, ``d(r e^g) = dY S0``,
``dB^ = U dS_L``, ``dK^ = V dS_L``, ``dS0 = dY^T R' + dS_L M^T`` with
``M = diag(e^gL) + Q^T B^``; the decay gradients collect ``x * dx`` of every decayed factor and
are summed back to ``w`` by reverse cumulative sums.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row(x, rows, j):
    """Row ``j`` of a register tile (Triton cannot index register tensors)."""
    return tl.sum(tl.where(rows[:, None] == j, x, 0.0), axis=0)


@triton.jit
def _col(x, cols, j):
    return tl.sum(tl.where(cols[None, :] == j, x, 0.0), axis=1)


@triton.jit
def _head_input(bh, T, H, N):
    """Offset and row stride of head ``bh % H`` of batch ``bh // H`` in a ``[B, T, H, N]`` input."""
    return (bh // H).to(tl.int64) * T * H * N + (bh % H) * N, H * N


@triton.jit
def _load_rows(ptr, base, t0, T, stride_t, cols, N, L: tl.constexpr):
    """``[L, len(cols)]`` fp32 tile of rows ``t0 .. t0+L-1`` (zero past ``T`` and past ``N``)."""
    t = t0 + tl.arange(0, L)
    mask = (t[:, None] < T) & (cols[None, :] < N)
    offs = base + t[:, None].to(tl.int64) * stride_t + cols[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, base, t0, T, stride_t, cols, N, x, L: tl.constexpr):
    t = t0 + tl.arange(0, L)
    mask = (t[:, None] < T) & (cols[None, :] < N)
    offs = base + t[:, None].to(tl.int64) * stride_t + cols[None, :]
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _key_column(b, k, g, gm, rows, j):
    """Key column ``j`` of the exact path: rows ``b_j``, ``k_j`` and the decays from it to every
    query row, ``e^(gm_t - g_j)`` (t > j) and ``e^(g_t - g_j)`` (t >= j), zero elsewhere (masked
    before exp: the non-causal exponents are positive)."""
    g_j = _row(g, rows, j)
    e_a = tl.exp(tl.where(rows[:, None] > j, gm - g_j[None, :], float("-inf")))
    e_r = tl.exp(tl.where(rows[:, None] >= j, g - g_j[None, :], float("-inf")))
    return _row(b, rows, j), _row(k, rows, j), e_a, e_r


@triton.jit
def _pair_matrices(r, k, a, b, g, gm, L: tl.constexpr):
    """The four decayed pair matrices of one chunk (see the module docstring)."""
    rows = tl.arange(0, L)
    A_ab = tl.zeros([L, L], dtype=tl.float32)
    A_ak = tl.zeros([L, L], dtype=tl.float32)
    A_rb = tl.zeros([L, L], dtype=tl.float32)
    A_rk = tl.zeros([L, L], dtype=tl.float32)
    for j in range(L):
        b_j, k_j, e_a, e_r = _key_column(b, k, g, gm, rows, j)
        a_dec = a * e_a
        r_dec = r * e_r
        at_j = rows[None, :] == j
        A_ab += tl.where(at_j, tl.sum(a_dec * b_j[None, :], axis=1)[:, None], 0.0)
        A_ak += tl.where(at_j, tl.sum(a_dec * k_j[None, :], axis=1)[:, None], 0.0)
        A_rb += tl.where(at_j, tl.sum(r_dec * b_j[None, :], axis=1)[:, None], 0.0)
        A_rk += tl.where(at_j, tl.sum(r_dec * k_j[None, :], axis=1)[:, None], 0.0)
    return A_ab, A_ak, A_rb, A_rk


@triton.jit
def _pair_matrices_factored(a_t, r_t, b_h, k_h, g_last, L: tl.constexpr, PREC: tl.constexpr):
    """The pair matrices as products of the chunk's decayed tiles ``a e^gm``, ``r e^g``,
    ``b e^(gL-g)``, ``k e^(gL-g)``, the query side rescaled by ``e^-gL`` (at most ``e^(L max|w|)``)."""
    rows = tl.arange(0, L)
    strict = rows[:, None] > rows[None, :]
    causal = rows[:, None] >= rows[None, :]
    from_end = tl.exp(-g_last)[None, :]
    a_s = a_t * from_end
    r_s = r_t * from_end
    bt = tl.trans(b_h)
    kt = tl.trans(k_h)
    A_ab = tl.where(strict, tl.dot(a_s, bt, input_precision=PREC), 0.0)
    A_ak = tl.where(strict, tl.dot(a_s, kt, input_precision=PREC), 0.0)
    A_rb = tl.where(causal, tl.dot(r_s, bt, input_precision=PREC), 0.0)
    A_rk = tl.where(causal, tl.dot(r_s, kt, input_precision=PREC), 0.0)
    return A_ab, A_ak, A_rb, A_rk


@triton.jit
def _pair_matrix_grads(r, k, a, b, g, gm, dA_ab, dA_ak, dA_rb, dA_rk, L: tl.constexpr, BN: tl.constexpr):
    """Gradients of a, r, b, k through the pair matrices, one key column j at a time (the exact
    path's exponents). The query-side decay gradient is q * dq, so only dq is accumulated."""
    rows = tl.arange(0, L)
    da_p = tl.zeros([L, BN], dtype=tl.float32)
    dr_p = tl.zeros([L, BN], dtype=tl.float32)
    db_p = tl.zeros([L, BN], dtype=tl.float32)
    dk_p = tl.zeros([L, BN], dtype=tl.float32)
    for j in range(L):
        b_j, k_j, e_a, e_r = _key_column(b, k, g, gm, rows, j)
        c_ab = _col(dA_ab, rows, j)[:, None]
        c_ak = _col(dA_ak, rows, j)[:, None]
        c_rb = _col(dA_rb, rows, j)[:, None]
        c_rk = _col(dA_rk, rows, j)[:, None]
        da_p += (c_ab * b_j[None, :] + c_ak * k_j[None, :]) * e_a
        dr_p += (c_rb * b_j[None, :] + c_rk * k_j[None, :]) * e_r
        a_e = a * e_a
        r_e = r * e_r
        at_j = rows[:, None] == j
        db_p += tl.where(at_j, tl.sum(c_ab * a_e + c_rb * r_e, axis=0)[None, :], 0.0)
        dk_p += tl.where(at_j, tl.sum(c_ak * a_e + c_rk * r_e, axis=0)[None, :], 0.0)
    return da_p, dr_p, db_p, dk_p


@triton.jit
def _unit_lower_inverse(A, L: tl.constexpr):
    """``(I - A)^-1`` for strictly lower-triangular ``A`` by exact forward substitution."""
    rows = tl.arange(0, L)
    inv = (rows[:, None] == rows[None, :]).to(tl.float32)
    for i in range(1, L):
        a_i = _row(A, rows, i)  # A[i, j], indexed by j
        # Row i of the inverse = e_i + sum_{j<i} A[i, j] inv[j, :]; rows >= i do not contribute
        # because A[i, j] = 0 there.
        inv += tl.where(rows[:, None] == i, tl.sum(a_i[:, None] * inv, axis=0)[None, :], 0.0)
    return inv


@triton.jit
def _chunk_decays(w, L: tl.constexpr):
    rows = tl.arange(0, L)
    g = tl.cumsum(w, axis=0)
    gm = g - w
    g_last = _row(g, rows, L - 1)
    return g, gm, g_last


@triton.jit
def _wkv7_prep_kernel(
    r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr,
    q_ptr, rp_ptr, bhat_ptr, dec_ptr, p_ptr, khat_ptr, yloc_ptr, amat_ptr,
    T, H, N, NT,
    L: tl.constexpr, BN: tl.constexpr, WITH_Y: tl.constexpr, STORE_A: tl.constexpr,
    PREC: tl.constexpr, FACTORED: tl.constexpr,
):
    """Per chunk into fp32 buffers ``[B*H, NT*L, N]`` (``dec``: ``[B*H, NT, N]``): Q, P, B^, K^
    and exp(gL) (for the state pass), R' (outputs and the gradient pass), with WITH_Y Y_loc,
    and with STORE_A ``Tinv, A_ak, A_rb, A_rk`` (``[B*H, NT, 4, L, L]``, for ``bwd_chunk``)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    in_base, stride = _head_input(bh, T, H, N)
    t0 = c * L
    cols = tl.arange(0, BN)
    r = _load_rows(r_ptr, in_base, t0, T, stride, cols, N, L)
    w = _load_rows(w_ptr, in_base, t0, T, stride, cols, N, L)
    k = _load_rows(k_ptr, in_base, t0, T, stride, cols, N, L)
    a = _load_rows(a_ptr, in_base, t0, T, stride, cols, N, L)
    b = _load_rows(b_ptr, in_base, t0, T, stride, cols, N, L)

    g, gm, g_last = _chunk_decays(w, L)
    to_end = tl.exp(g_last[None, :] - g)
    a_t = a * tl.exp(gm)
    r_t = r * tl.exp(g)
    b_h = b * to_end
    k_h = k * to_end
    if FACTORED:
        A_ab, A_ak, A_rb, A_rk = _pair_matrices_factored(a_t, r_t, b_h, k_h, g_last, L, PREC)
    else:
        A_ab, A_ak, A_rb, A_rk = _pair_matrices(r, k, a, b, g, gm, L)
    Tinv = _unit_lower_inverse(A_ab, L)
    Q = tl.dot(Tinv, a_t, input_precision=PREC)
    Rp = r_t + tl.dot(A_rb, Q, input_precision=PREC)

    buf_base = bh.to(tl.int64) * NT * L * N
    TP = NT * L
    _store_rows(q_ptr, buf_base, t0, TP, N, cols, N, Q, L)
    _store_rows(rp_ptr, buf_base, t0, TP, N, cols, N, Rp, L)
    _store_rows(bhat_ptr, buf_base, t0, TP, N, cols, N, b_h, L)
    _store_rows(khat_ptr, buf_base, t0, TP, N, cols, N, k_h, L)
    tl.store(dec_ptr + (bh.to(tl.int64) * NT + c) * N + cols, tl.exp(g_last), mask=cols < N)
    v = _load_rows(v_ptr, in_base, t0, T, stride, cols, N, L)
    P = tl.dot(Tinv, tl.dot(A_ak, v, input_precision=PREC), input_precision=PREC)
    _store_rows(p_ptr, buf_base, t0, TP, N, cols, N, P, L)
    if WITH_Y:
        Yloc = tl.dot(A_rb, P, input_precision=PREC) + tl.dot(A_rk, v, input_precision=PREC)
        _store_rows(yloc_ptr, buf_base, t0, TP, N, cols, N, Yloc, L)
    if STORE_A:
        rows = tl.arange(0, L)
        a_base = (bh.to(tl.int64) * NT + c) * 4 * L * L
        a_ptrs = amat_ptr + a_base + rows[:, None] * L + rows[None, :]
        tl.store(a_ptrs, Tinv)
        tl.store(a_ptrs + L * L, A_ak)
        tl.store(a_ptrs + 2 * L * L, A_rb)
        tl.store(a_ptrs + 3 * L * L, A_rk)


@triton.jit
def _state_rows(ptr, bh, iv, N, HAS: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr):
    """Rows ``iv`` of head ``bh``'s ``N x N`` state in ``ptr`` (zeros without ``HAS``), with their
    offsets and mask for later stores."""
    ik = tl.arange(0, BN)
    s_mask = (iv[:, None] < N) & (ik[None, :] < N)
    s_off = iv[:, None] * N + ik[None, :]
    if HAS:
        S = tl.load(ptr + bh.to(tl.int64) * N * N + s_off, mask=s_mask, other=0.0)
    else:
        S = tl.zeros([BV, BN], dtype=tl.float32)
    return S, s_off, s_mask


@triton.jit
def _state_scan(
    bh, iv, v_ptr, y_ptr, q_ptr, rp_ptr, bhat_ptr, khat_ptr, p_ptr, yloc_ptr, dec_ptr,
    s0_ptr, states_ptr, sT_ptr, T, H, N, NT,
    L: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr,
    WRITE_Y: tl.constexpr, STORE_STATES: tl.constexpr, PREC: tl.constexpr,
):
    """Rows ``iv`` of the state through all chunks: the final state, and the outputs (forward,
    WRITE_Y) or the state entering each chunk (backward's recomputation, STORE_STATES)."""
    ik = tl.arange(0, BN)
    in_base, stride = _head_input(bh, T, H, N)
    buf_base = bh.to(tl.int64) * NT * L * N
    TP = NT * L
    S, s_off, s_mask = _state_rows(s0_ptr, bh, iv, N, HAS_INIT, BV, BN)
    for c in range(NT):
        t0 = c * L
        if STORE_STATES:
            tl.store(states_ptr + (bh.to(tl.int64) * NT + c) * N * N + s_off, S, mask=s_mask)
        Q = _load_rows(q_ptr, buf_base, t0, TP, N, ik, N, L)
        Bh = _load_rows(bhat_ptr, buf_base, t0, TP, N, ik, N, L)
        Kh = _load_rows(khat_ptr, buf_base, t0, TP, N, ik, N, L)
        P = _load_rows(p_ptr, buf_base, t0, TP, N, iv, N, L)
        V = _load_rows(v_ptr, in_base, t0, T, stride, iv, N, L)
        dec = tl.load(dec_ptr + (bh.to(tl.int64) * NT + c) * N + ik, mask=ik < N, other=0.0)
        St = tl.trans(S)
        U = P + tl.dot(Q, St, input_precision=PREC)
        if WRITE_Y:
            Rp = _load_rows(rp_ptr, buf_base, t0, TP, N, ik, N, L)
            Yloc = _load_rows(yloc_ptr, buf_base, t0, TP, N, iv, N, L)
            Y = Yloc + tl.dot(Rp, St, input_precision=PREC)
            _store_rows(y_ptr, in_base, t0, T, stride, iv, N, Y, L)
        S = (
            S * dec[None, :]
            + tl.dot(tl.trans(U), Bh, input_precision=PREC)
            + tl.dot(tl.trans(V), Kh, input_precision=PREC)
        )
    tl.store(sT_ptr + bh.to(tl.int64) * N * N + s_off, S, mask=s_mask)


@triton.jit
def _grad_scan(
    bh, iv, dy_ptr, rp_ptr, q_ptr, bhat_ptr, dec_ptr, dsT_ptr, dstates_ptr, ds0_ptr,
    T, H, N, NT,
    L: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, HAS_DFINAL: tl.constexpr,
    PREC: tl.constexpr,
):
    """State gradient backwards through the chunks: ``dS0 = dY^T R' + dS_L M^T`` with the chunk
    transition ``M = diag(e^gL) + Q^T B^``; stores the gradient at each chunk's end."""
    ik = tl.arange(0, BN)
    in_base, stride = _head_input(bh, T, H, N)
    buf_base = bh.to(tl.int64) * NT * L * N
    TP = NT * L
    dS, s_off, s_mask = _state_rows(dsT_ptr, bh, iv, N, HAS_DFINAL, BV, BN)
    for i in range(NT):
        c = NT - 1 - i
        t0 = c * L
        tl.store(dstates_ptr + (bh.to(tl.int64) * NT + c) * N * N + s_off, dS, mask=s_mask)
        dY = _load_rows(dy_ptr, in_base, t0, T, stride, iv, N, L)
        Rp = _load_rows(rp_ptr, buf_base, t0, TP, N, ik, N, L)
        Q = _load_rows(q_ptr, buf_base, t0, TP, N, ik, N, L)
        Bh = _load_rows(bhat_ptr, buf_base, t0, TP, N, ik, N, L)
        dec = tl.load(dec_ptr + (bh.to(tl.int64) * NT + c) * N + ik, mask=ik < N, other=0.0)
        dS_B = tl.dot(dS, tl.trans(Bh), input_precision=PREC)  # [BV, L]
        dS = (
            dS * dec[None, :]
            + tl.dot(tl.trans(dY), Rp, input_precision=PREC)
            + tl.dot(dS_B, Q, input_precision=PREC)
        )
    tl.store(ds0_ptr + bh.to(tl.int64) * N * N + s_off, dS, mask=s_mask)


@triton.jit
def _wkv7_fwd_scan_kernel(
    v_ptr, y_ptr, q_ptr, rp_ptr, bhat_ptr, khat_ptr, p_ptr, yloc_ptr, dec_ptr, s0_ptr, sT_ptr,
    T, H, N, NT, BH,
    L: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Forward: outputs and final state; grid ``(B*H, cdiv(N, BV))``."""
    iv = tl.program_id(1) * BV + tl.arange(0, BV)
    _state_scan(
        tl.program_id(0), iv, v_ptr, y_ptr, q_ptr, rp_ptr, bhat_ptr, khat_ptr, p_ptr, yloc_ptr,
        dec_ptr, s0_ptr, sT_ptr, sT_ptr, T, H, N, NT,
        L, BN, BV, HAS_INIT, True, False, PREC,
    )


@triton.jit
def _wkv7_bwd_scans_kernel(
    v_ptr, dy_ptr, q_ptr, rp_ptr, bhat_ptr, khat_ptr, p_ptr, dec_ptr,
    s0_ptr, states_ptr, sT_ptr, dsT_ptr, dstates_ptr, ds0_ptr,
    T, H, N, NT, BH,
    L: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr,
    HAS_DFINAL: tl.constexpr, PREC: tl.constexpr,
):
    """Backward's two sequential passes in one launch, grid ``(B*H, cdiv(N, BV), 2)``: they are
    independent (the gradient pass needs no state), so running them side by side halves the
    latency-bound part when B*H is small. Axis 2 = 0 recomputes the chunk-entry states, 1 runs
    the state gradient backwards."""
    iv = tl.program_id(1) * BV + tl.arange(0, BV)
    if tl.program_id(2) == 0:
        _state_scan(
            tl.program_id(0), iv, v_ptr, v_ptr, q_ptr, rp_ptr, bhat_ptr, khat_ptr, p_ptr, p_ptr,
            dec_ptr, s0_ptr, states_ptr, sT_ptr, T, H, N, NT,
            L, BN, BV, HAS_INIT, False, True, PREC,
        )
    else:
        _grad_scan(
            tl.program_id(0), iv, dy_ptr, rp_ptr, q_ptr, bhat_ptr, dec_ptr, dsT_ptr, dstates_ptr,
            ds0_ptr, T, H, N, NT,
            L, BN, BV, HAS_DFINAL, PREC,
        )


@triton.jit
def _wkv7_bwd_chunk_kernel(
    r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr, amat_ptr, states_ptr, dstates_ptr,
    dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr,
    T, H, N, NT,
    L: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, FACTORED: tl.constexpr,
):
    """Every input gradient of one chunk from its entry state ``S0``, the gradient ``dS_L`` at its
    end (both from ``bwd_scans``), ``dY`` and the pair matrices stored by ``prep``."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    in_base, stride = _head_input(bh, T, H, N)
    t0 = c * L
    rows = tl.arange(0, L)
    cols = tl.arange(0, BN)
    r = _load_rows(r_ptr, in_base, t0, T, stride, cols, N, L)
    w = _load_rows(w_ptr, in_base, t0, T, stride, cols, N, L)
    k = _load_rows(k_ptr, in_base, t0, T, stride, cols, N, L)
    v = _load_rows(v_ptr, in_base, t0, T, stride, cols, N, L)
    a = _load_rows(a_ptr, in_base, t0, T, stride, cols, N, L)
    b = _load_rows(b_ptr, in_base, t0, T, stride, cols, N, L)
    dY = _load_rows(dy_ptr, in_base, t0, T, stride, cols, N, L)
    st_base = (bh.to(tl.int64) * NT + c) * N * N
    s_mask = (cols[:, None] < N) & (cols[None, :] < N)
    s_off = cols[:, None] * N + cols[None, :]
    S0 = tl.load(states_ptr + st_base + s_off, mask=s_mask, other=0.0)
    dSL = tl.load(dstates_ptr + st_base + s_off, mask=s_mask, other=0.0)

    g, gm, g_last = _chunk_decays(w, L)
    a_ptrs = amat_ptr + (bh.to(tl.int64) * NT + c) * 4 * L * L + rows[:, None] * L + rows[None, :]
    Tinv = tl.load(a_ptrs)
    A_ak = tl.load(a_ptrs + L * L)
    A_rb = tl.load(a_ptrs + 2 * L * L)
    A_rk = tl.load(a_ptrs + 3 * L * L)
    e_gm = tl.exp(gm)
    e_g = tl.exp(g)
    to_end = tl.exp(g_last[None, :] - g)
    a_t = a * e_gm
    r_t = r * e_g
    b_h = b * to_end
    k_h = k * to_end

    X = tl.dot(A_ak, v, input_precision=PREC) + tl.dot(a_t, tl.trans(S0), input_precision=PREC)
    U = tl.dot(Tinv, X, input_precision=PREC)
    dU = tl.dot(tl.trans(A_rb), dY, input_precision=PREC) + tl.dot(
        b_h, tl.trans(dSL), input_precision=PREC
    )
    dX = tl.dot(tl.trans(Tinv), dU, input_precision=PREC)
    strict = rows[:, None] > rows[None, :]
    causal = rows[:, None] >= rows[None, :]
    dA_ab = tl.where(strict, tl.dot(dX, tl.trans(U), input_precision=PREC), 0.0)
    dA_ak = tl.where(strict, tl.dot(dX, tl.trans(v), input_precision=PREC), 0.0)
    dA_rb = tl.where(causal, tl.dot(dY, tl.trans(U), input_precision=PREC), 0.0)
    dA_rk = tl.where(causal, tl.dot(dY, tl.trans(v), input_precision=PREC), 0.0)
    dv = (
        tl.dot(tl.trans(A_ak), dX, input_precision=PREC)
        + tl.dot(tl.trans(A_rk), dY, input_precision=PREC)
        + tl.dot(k_h, tl.trans(dSL), input_precision=PREC)
    )
    d_at = tl.dot(dX, S0, input_precision=PREC)
    d_rt = tl.dot(dY, S0, input_precision=PREC)
    d_bh = tl.dot(U, dSL, input_precision=PREC)
    d_kh = tl.dot(v, dSL, input_precision=PREC)

    # Gradients through the pair matrices; da_p etc. are the gradients of a, r, b, k through them.
    if FACTORED:
        # Same factorisation as the forward pass: products with the decayed tiles, rescaled.
        from_end = tl.exp(-g_last)[None, :]
        from_start = tl.exp(-g)
        da_p = (tl.dot(dA_ab, b_h, input_precision=PREC)
                + tl.dot(dA_ak, k_h, input_precision=PREC)) * from_end * e_gm
        dr_p = (tl.dot(dA_rb, b_h, input_precision=PREC)
                + tl.dot(dA_rk, k_h, input_precision=PREC)) * from_end * e_g
        db_p = (tl.dot(tl.trans(dA_ab), a_t, input_precision=PREC)
                + tl.dot(tl.trans(dA_rb), r_t, input_precision=PREC)) * from_start
        dk_p = (tl.dot(tl.trans(dA_ak), a_t, input_precision=PREC)
                + tl.dot(tl.trans(dA_rk), r_t, input_precision=PREC)) * from_start
    else:
        da_p, dr_p, db_p, dk_p = _pair_matrix_grads(r, k, a, b, g, gm, dA_ab, dA_ak, dA_rb, dA_rk, L, BN)

    da = d_at * e_gm + da_p
    dr = d_rt * e_g + dr_p
    db = d_bh * to_end + db_p
    dk = d_kh * to_end + dk_p
    to_end_grad = d_bh * b_h + d_kh * k_h
    d_gm = d_at * a_t + a * da_p
    d_g = d_rt * r_t + r * dr_p - b * db_p - k * dk_p - to_end_grad
    d_glast = tl.sum(to_end_grad, axis=0) + tl.sum(dSL * S0, axis=0) * tl.exp(g_last)
    # g_t = sum_{s<=t} w_s, gm_t = sum_{s<t} w_s, g_last = sum_s w_s.
    rev_g = tl.sum(d_g, axis=0)[None, :] - tl.cumsum(d_g, axis=0) + d_g
    rev_gm = tl.sum(d_gm, axis=0)[None, :] - tl.cumsum(d_gm, axis=0)
    dw = rev_g + rev_gm + d_glast[None, :]

    _store_rows(dr_ptr, in_base, t0, T, stride, cols, N, dr, L)
    _store_rows(dw_ptr, in_base, t0, T, stride, cols, N, dw, L)
    _store_rows(dk_ptr, in_base, t0, T, stride, cols, N, dk, L)
    _store_rows(dv_ptr, in_base, t0, T, stride, cols, N, dv, L)
    _store_rows(da_ptr, in_base, t0, T, stride, cols, N, da, L)
    _store_rows(db_ptr, in_base, t0, T, stride, cols, N, db, L)
