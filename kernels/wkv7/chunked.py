"""The chunked backend: RWKV-7's recurrence in chunks of ``L`` tokens with matrix products.

Per chunk (all chunks at once, batched over batch x heads x chunks), with ``g_t`` the cumulative
log-decay inside the chunk (inclusive, ``g_0 = 0``) and ``S_0`` the state entering the chunk:

* ``u_t = S_{t-1} a_t`` (the delta-rule correction) satisfies the unit lower-triangular system
  ``U = A_ab U + A_ak V + (a * exp(g_{t-1})) S_0^T`` with
  ``A_xy[t, j] = sum_c x_t[c] y_j[c] exp(g_{t-1}[c] - g_j[c])`` for ``j < t``; one triangular
  solve gives ``U = P + Q S_0^T`` (the WY/UT form: P and Q do not depend on ``S_0``);
* the state leaving the chunk is
  ``S_L = S_0 diag(exp g_L) + U^T (b * exp(g_L - g)) + V^T (k * exp(g_L - g))``;
* the outputs are ``Y = (r * exp(g)) S_0^T + A_rb U + A_rk V`` with ``A_r*`` as above but with
  ``exp(g_t - g_j)``, ``j <= t``.

Only the pass over the chunks (``U`` from ``S_0``, then ``S_L``) is sequential; everything else
is batched over all chunks of a segment.

Numerics: in ``_pair_matrices`` every exponent is a difference ``g_later - g_earlier`` of
cumulative log-decays of one chunk, which is <= 0 because ``w <= 0`` (checked), so nothing
overflows whatever the decay; it still runs the pair products as matrix products, in ``log L``
levels. When the decay is bounded (``checks.factored_pairs_fit``, always for RWKV-7's
parametrisation) ``_pair_matrices_factored`` does it in one product of tiles rescaled through the
chunk's end, ``exp(g_t - g_L) * exp(g_L - g_j)``, whose factors then stay inside fp32's range.

Memory: the sequence is processed in segments of whole chunks under a custom autograd Function
that saves only its inputs and the state entering each segment, and recomputes a segment's
intra-chunk quantities in the backward pass; transient memory is bounded by the segment size.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .checks import factored_pairs_fit, log_decay_min

DEFAULT_CHUNK_SIZE = 16
# Elements of one [batch x heads, tokens, N] input slice per segment. The intra-chunk
# temporaries are a few times this (and the L x L pair matrices add 4 L^2 per chunk), so a segment
# stays cache-sized on the CPU and its transient memory stays small on a GPU.
_SEGMENT_ELEMENTS = 1 << 18


def _pair_matrices(q, q_log, keys, g):
    """Decayed pair products ``A[x, t, y, j] = sum_c q_x[t, c] key_y[j, c] exp(q_log_x[t, c] - g[j, c])``.

    ``q``/``q_log``: ``[D, 2, L, N]`` (x = 0: a with the exclusive cumulative log-decay, only
    ``j < t`` kept; x = 1: r with the inclusive one, ``j <= t``); ``keys``: ``[D, 2, L, N]`` (b, k);
    ``g``: ``[D, L, N]`` inclusive cumulative log-decay; L a power of two. Returns
    ``[D, 2, L, 2, L]`` (zero above the kept triangle).

    Divide and conquer over the chunk: at half-width h the chunk splits into blocks of 2h tokens,
    and every pair with the query in a block's right half and the key in its left half factorises
    through the left half's last position m as ``exp(q_log_t - g_m) * exp(g_m - g_j)``: both
    exponents are <= 0 and one batched matrix product covers all such pairs. Each pair ``j < t``
    is split at exactly one level; ``j == t`` (r only) has no decay.
    """
    D, _, L, N = q.shape
    A = q.new_zeros(D, 2, L, 2, L)
    same = (q[:, 1, None] * keys).sum(-1)  # [D, y, L]: r_t . key_t
    torch.diagonal(A[:, 1], dim1=1, dim2=3).copy_(same)
    h = 1
    while h < L:
        blocks = L // (2 * h)
        q_right = q.view(D, 2, blocks, 2, h, N)[:, :, :, 1]  # [D, x, block, h, N]
        log_right = q_log.view(D, 2, blocks, 2, h, N)[:, :, :, 1]
        key_left = keys.view(D, 2, blocks, 2, h, N)[:, :, :, 0]
        g_left = g.view(D, blocks, 2, h, N)[:, :, 0]  # [D, block, h, N]
        g_mid = g_left[:, :, -1:]  # [D, block, 1, N]
        q_scaled = q_right * torch.exp(log_right - g_mid[:, None])
        k_scaled = key_left * torch.exp(g_mid - g_left)[:, None]
        prod = q_scaled.transpose(1, 2).reshape(D, blocks, 2 * h, N) @ k_scaled.transpose(
            1, 2
        ).reshape(D, blocks, 2 * h, N).transpose(-1, -2)  # [D, block, (x, t), (y, j)]
        target = A.view(D, 2, blocks, 2, h, 2, blocks, 2, h)[:, :, :, 1, :, :, :, 0, :]
        torch.diagonal(target, dim1=2, dim2=5).copy_(
            prod.view(D, blocks, 2, h, 2, h).permute(0, 2, 3, 4, 5, 1)
        )
        h *= 2
    return A


def _pair_matrices_factored(q, q_log, keys, g):
    """``_pair_matrices`` (same arguments and result) as one batched product, for bounded decay:
    ``exp(q_log_t - g_j) = exp(q_log_t - g_L) * exp(g_L - g_j)``; the first factor is at most
    ``e^(L max|w|)``, the second at most 1, so the caller must check ``factored_pairs_fit``."""
    D, _, L, N = q.shape
    g_end = g[:, -1:]  # [D, 1, N]
    q_scaled = q * torch.exp(q_log - g_end[:, None])
    k_scaled = keys * torch.exp(g_end - g)[:, None]
    A = (q_scaled.reshape(D, 2 * L, N) @ k_scaled.reshape(D, 2 * L, N).transpose(-1, -2)).view(D, 2, L, 2, L)
    rows = torch.arange(L, device=q.device)
    keep = torch.stack((rows[:, None] > rows[None, :], rows[:, None] >= rows[None, :]))  # a: j < t; r: j <= t
    return torch.where(keep[None, :, :, None, :], A, A.new_zeros(()))


class _StateScan(torch.autograd.Function):
    """The sequential pass over the chunks of a segment, with its backward written out: autograd
    through a Python loop of small products spends more on its graph (a node per op and chunk,
    zero-filled gradients for every unbound slice) than on the products.

    Per chunk ``c`` (state ``S`` ``[G, N_v, N_k]``): ``U_c = P_c + Q_c S^T``,
    ``S <- S * d_c + U_c^T B_c + KV_c``. Inputs and outputs are chunk-major ``[C*G, ...]``, so each
    step reads and writes whole contiguous blocks, in place. Returns the states entering the
    chunks ``[C*G, N, N]``, ``U`` ``[C*G, L, N]`` and the state after the last chunk."""

    @staticmethod
    def forward(ctx, P, Q, b_end, S_kv, decay, state, G):
        D, L, N = P.shape
        C = D // G
        Pc, Qc, Bc, KVc, Dc = (x.view(C, G, *x.shape[1:]) for x in (P, Q, b_end, S_kv, decay))
        S_all = P.new_empty(C + 1, G, N, N)  # S_all[c]: the state entering chunk c
        S_all[0] = state
        U = P.new_empty(C, G, L, N)
        for c in range(C):
            torch.baddbmm(Pc[c], Qc[c], S_all[c].transpose(-1, -2), out=U[c])
            torch.addcmul(KVc[c], S_all[c], Dc[c], out=S_all[c + 1]).baddbmm_(U[c].transpose(-1, -2), Bc[c])
        ctx.save_for_backward(Q, b_end, decay, S_all, U)
        ctx.G = G
        return S_all[:C].view(D, N, N), U.view(D, L, N), S_all[C].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dS_in, dU, dS):
        Q, b_end, decay, S_all, U = ctx.saved_tensors
        C, G, L, N = U.shape
        Qc, Bc, Dc = (x.view(C, G, *x.shape[1:]) for x in (Q, b_end, decay))
        dS_in, dU = dS_in.reshape(C, G, N, N), dU.reshape(C, G, L, N)
        dP, dQ, dB = torch.empty_like(U), torch.empty_like(U), torch.empty_like(U)
        # dKV[c] is the gradient of the state leaving chunk c; the loop carries it in place.
        dKV, dDecay = U.new_empty(C, G, N, N), torch.empty_like(Dc)
        dKV[C - 1] = dS
        first = U.new_empty(G, N, N)  # the gradient of the state entering chunk 0
        for c in reversed(range(C)):
            dS, S_c = dKV[c], S_all[c]
            torch.sum(dS * S_c, dim=-2, keepdim=True, out=dDecay[c])
            dU_c = torch.baddbmm(dU[c], Bc[c], dS.transpose(-1, -2), out=dP[c])  # [G, L, N_v]
            torch.bmm(U[c], dS, out=dB[c])
            torch.bmm(dU_c, S_c, out=dQ[c])
            prev = dKV[c - 1] if c > 0 else first
            torch.addcmul(dS_in[c], dS, Dc[c], out=prev).baddbmm_(dU_c.transpose(-1, -2), Qc[c])
        D = C * G
        return dP.view(D, L, N), dQ.view(D, L, N), dB.view(D, L, N), dKV.view(D, N, N), dDecay.view(D, 1, N), first, None


def _segment(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
    chunk: int,
    factored: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Differentiable chunked recurrence over one segment (``factored``: the pair products in one
    matrix product, allowed only when ``factored_pairs_fit``).

    ``r .. b``: fp32 ``[G, T, N]`` (G = batch x heads, T a multiple of ``chunk``), ``w <= 0``;
    ``state``: fp32 ``[G, N, N]``. Returns ``y [G, T, N]`` and the state after the segment.
    """
    G, T, N = r.shape
    C, L = T // chunk, chunk
    D = G * C
    # Chunk-major [C*G, L, N]: the state scan then steps through contiguous blocks.
    r, w, k, v, a, b = (t.reshape(G, C, L, N).transpose(0, 1).reshape(D, L, N) for t in (r, w, k, v, a, b))

    g = w.cumsum(dim=1)  # inclusive: log-decay from the chunk start through token t
    g_prev = F.pad(g[:, :-1], (0, 0, 1, 0))  # exclusive: through token t-1
    g_end = g[:, -1:]

    pairs = _pair_matrices_factored if factored else _pair_matrices
    A = pairs(torch.stack((a, r), dim=1), torch.stack((g_prev, g), dim=1), torch.stack((b, k), dim=1), g)
    A_ab, A_ak, A_rb, A_rk = A[:, 0, :, 0], A[:, 0, :, 1], A[:, 1, :, 0], A[:, 1, :, 1]

    eye = torch.eye(L, dtype=r.dtype, device=r.device)
    rhs = torch.cat((A_ak @ v, a * torch.exp(g_prev)), dim=-1)
    PQ = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)
    P, Q = PQ[..., :N], PQ[..., N:]

    to_end = torch.exp(g_end - g)
    b_end = b * to_end
    S_kv = v.transpose(-1, -2) @ (k * to_end)  # [D, N_v, N_k]
    chunk_decay = torch.exp(g_end)  # [D, 1, N_k]

    S_in, U, state = _StateScan.apply(P, Q, b_end, S_kv, chunk_decay, state, G)
    y = torch.baddbmm(
        torch.cat((A_rb, A_rk), dim=-1) @ torch.cat((U, v), dim=1),
        r * torch.exp(g),
        S_in.transpose(-1, -2),
    )
    return y.view(C, G, L, N).transpose(0, 1).reshape(G, T, N), state


def _segment_bounds(T: int, G: int, N: int, chunk: int) -> List[Tuple[int, int]]:
    step = max(1, _SEGMENT_ELEMENTS // (G * N * chunk)) * chunk
    return [(t0, min(T, t0 + step)) for t0 in range(0, T, step)]


class _ChunkedWKV7(torch.autograd.Function):
    """Segment-wise recomputation: forward keeps one state per segment, backward re-runs each
    segment (last to first) under autograd, carrying the state gradient backwards."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, state, chunk, factored):
        G, T, N = r.shape
        bounds = _segment_bounds(T, G, N, chunk)
        ys, entering = [], []
        for t0, t1 in bounds:
            entering.append(state)
            y, state = _segment(r[:, t0:t1], w[:, t0:t1], k[:, t0:t1], v[:, t0:t1],
                                a[:, t0:t1], b[:, t0:t1], state, chunk, factored)
            ys.append(y)
        ctx.save_for_backward(r, w, k, v, a, b, *entering)
        ctx.chunk, ctx.bounds, ctx.factored = chunk, bounds, factored
        return torch.cat(ys, dim=1), state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dstate):
        r, w, k, v, a, b, *entering = ctx.saved_tensors
        inputs = (r, w, k, v, a, b)
        wanted = [i for i in range(6) if ctx.needs_input_grad[i]]
        grads = [torch.zeros_like(inputs[i]) if i in wanted else None for i in range(6)]
        for (t0, t1), s_in in zip(reversed(ctx.bounds), reversed(entering)):
            with torch.enable_grad():
                leaves = [x[:, t0:t1].detach().requires_grad_(i in wanted) for i, x in enumerate(inputs)]
                s_leaf = s_in.detach().requires_grad_(True)
                y, s_out = _segment(*leaves, s_leaf, ctx.chunk, ctx.factored)
                targets = [leaves[i] for i in wanted] + [s_leaf]
                got = torch.autograd.grad((y, s_out), targets, (dy[:, t0:t1], dstate))
            for i, gi in zip(wanted, got[:-1]):
                grads[i][:, t0:t1] = gi
            dstate = got[-1]
        return (*grads, dstate if ctx.needs_input_grad[6] else None, None, None)


def wkv7_chunked(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked RWKV-7 recurrence (same contract as ``wkv7_naive``); y is returned in fp32.

    ``chunk_size`` (default 16, a power of two) is the chunk length ``L``: intra-chunk work grows
    like ``log L`` per token, the sequential state pass takes ``T / L`` steps. Requires finite
    ``w <= 0`` (checked; this reads w once, a device sync on a GPU).
    """
    chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or chunk & (chunk - 1):
        raise ValueError(
            f"wkv7 (chunked): chunk_size must be a power of two (e.g. 16 or 32), got {chunk_size!r}"
        )
    w_min = log_decay_min(w, "chunked")
    factored = w_min is not None and factored_pairs_fit(chunk, w_min)
    B, T, H, N = r.shape
    pad = (-T) % chunk

    def to_gtn(x: torch.Tensor) -> torch.Tensor:
        # Padding with zeros is an identity step (decay exp(0) = 1, no update), so the final state
        # is unchanged; the padded outputs are dropped.
        x = x.float().permute(0, 2, 1, 3)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(B * H, T + pad, N)

    if initial_state is None:
        state = r.new_zeros(B * H, N, N, dtype=torch.float32)
    else:
        state = initial_state.reshape(B * H, N, N)
    y, state = _ChunkedWKV7.apply(*(to_gtn(x) for x in (r, w, k, v, a, b)), state, chunk, factored)
    y = y.reshape(B, H, T + pad, N)[:, :, :T].permute(0, 2, 1, 3).contiguous()
    return y, state.reshape(B, H, N, N)
