"""The chunked backend: RWKV-7's recurrence in chunks of ``L`` tokens with matrix products.

Per chunk (all chunks at once, batched over batch x heads x chunks), with ``g_t`` the cumulative
log-decay inside the chunk (inclusive, ``g_0 = 0``) and ``S_0`` the state entering the chunk:

* ``u_t = S_{t-1} a_t`` (the delta-rule correction) satisfies the unit lower-triangular system
  ``U = A_ab U + A_ak V + (a * exp(g_{t-1})) S_0^T`` with
  ``A_xy[t, j] = sum_c x_t[c] y_j[c] exp(g_{t-1}[c] - g_j[c])`` for ``j < t``; the inverse of
  ``I - A_ab`` (``_unit_lower_inverse``) gives ``U = P + Q S_0^T`` (the WY/UT form: P and Q do not depend on ``S_0``);
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
parametrisation) ``_factored_pairs`` does it in one product of tiles rescaled through the
chunk's end, ``exp(g_t - g_L) * exp(g_L - g_j)``, whose factors then stay inside fp32's range.

Memory: the sequence is processed in segments of whole chunks under a custom autograd Function
that saves only its inputs and the state entering each segment; the backward pass recomputes a
segment's forward quantities without autograd and applies the gradient written out in
``chunked_grad.py``. Transient memory is bounded by the segment size.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .checks import factored_pairs_fit, log_decay_min
from .chunked_grad import ChunkTerms, segment_backward, strict_lower_mask

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


def _factored_pairs(q_end: torch.Tensor, k_end: torch.Tensor) -> torch.Tensor:
    """The masked pair products ``[D, 2L, 2L]`` from queries decayed to the chunk's end and keys
    decayed from it (both ``[D, 2, L, N]``)."""
    D, _, L, N = q_end.shape
    A = q_end.view(D, 2 * L, N) @ k_end.view(D, 2 * L, N).transpose(-1, -2)
    return A.masked_fill_(~strict_lower_mask(L, A.device), 0.0)


def _pair_matrices_factored(q, q_log, keys, g):
    """``_pair_matrices`` (same arguments and result) as one batched product, for bounded decay:
    ``exp(q_log_t - g_j) = exp(q_log_t - g_L) * exp(g_L - g_j)``; the first factor is at most
    ``e^(L max|w|)``, the second at most 1, so the caller must check ``factored_pairs_fit``."""
    D, _, L, N = q.shape
    g_end = g[:, -1:]
    A = _factored_pairs(q * torch.exp(q_log - g_end[:, None]), keys * torch.exp(g_end - g)[:, None])
    return A.view(D, 2, L, 2, L)


def _unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """``(I - A)^-1`` for strictly lower triangular ``A`` ``[D, L, L]``, L a power of two.

    ``A`` is nilpotent (``A^L = 0``), so the inverse is ``(I + A)(I + A^2)(I + A^4)...``: ``log L``
    squarings and products of L x L tiles, far cheaper on the CPU than a batched triangular solve
    with the 2N right-hand sides, and the backward reuses it transposed."""
    L = A.shape[-1]
    inverse = A + torch.eye(L, dtype=A.dtype, device=A.device)
    power, n = A, 2
    while n < L:
        power = power @ power
        inverse = torch.baddbmm(inverse, power, inverse)
        n *= 2
    return inverse


def _chunk_terms(r, w, k, v, a, b, factored: bool) -> ChunkTerms:
    """A segment's state-independent quantities (chunk-major ``[D, L, N]`` inputs, ``w <= 0``)."""
    D, L, N = r.shape
    g = w.cumsum(dim=1)  # inclusive: log-decay from the chunk start through token t
    g_end = g[:, -1:]
    queries, keys = torch.stack((a, r), dim=1), torch.stack((b, k), dim=1)
    q_log = torch.stack((g - w, g), dim=1)  # a: exclusive (through t-1), r: inclusive
    to_end = torch.exp(g_end - g)
    k_end = keys * to_end[:, None]
    decay = torch.exp(g_end)
    if factored:
        q_scale = torch.exp(q_log - g_end[:, None])
        q_end = queries * q_scale
        q_start = q_end * decay[:, None]
        A = _factored_pairs(q_end, k_end)
    else:
        q_scale = torch.exp(q_log)
        q_end, q_start = None, queries * q_scale
        A = _pair_matrices(queries, q_log, keys, g).view(D, 2 * L, 2 * L)
    inverse = _unit_lower_inverse(A[:, :L, :L])
    PQ = inverse @ torch.cat((A[:, :L, L:] @ v, q_start[:, 0]), dim=-1)
    return ChunkTerms(queries, keys, q_log, v, q_scale, q_end, q_start, k_end, to_end, decay, A,
                      inverse, PQ[..., :N], PQ[..., N:])


def _state_scan(terms: ChunkTerms, state: torch.Tensor, G: int):
    """The sequential pass over a segment's chunks (state ``[G, N_v, N_k]``): per chunk ``c``,
    ``U_c = P_c + Q_c S^T``, ``S <- S * decay_c + U_c^T b_end_c + V_c^T k_end_c``. Chunk-major
    inputs, so each step reads and writes whole contiguous blocks, in place. Returns the states
    entering each chunk followed by the leaving one ``[C + 1, G, N, N]``, and ``U`` ``[D, L, N]``."""
    D, L, N = terms.P.shape
    C = D // G
    S_kv = terms.v.transpose(-1, -2) @ terms.k_end[:, 1]  # [D, N_v, N_k]
    Pc, Qc, Bc, KVc, Dc = (x.reshape(C, G, *x.shape[1:])
                           for x in (terms.P, terms.Q, terms.k_end[:, 0], S_kv, terms.decay))
    S_all = state.new_empty(C + 1, G, N, N)
    S_all[0] = state
    U = state.new_empty(C, G, L, N)
    for c in range(C):
        torch.baddbmm(Pc[c], Qc[c], S_all[c].transpose(-1, -2), out=U[c])
        torch.addcmul(KVc[c], S_all[c], Dc[c], out=S_all[c + 1]).baddbmm_(U[c].transpose(-1, -2), Bc[c])
    return S_all, U.view(D, L, N)


def _to_chunk_major(x: torch.Tensor, chunk: int) -> torch.Tensor:
    G, T, N = x.shape
    C = T // chunk
    return x.reshape(G, C, chunk, N).transpose(0, 1).reshape(C * G, chunk, N)


def _from_chunk_major(x: torch.Tensor, G: int) -> torch.Tensor:
    D, L, N = x.shape
    return x.view(D // G, G, L, N).transpose(0, 1).reshape(G, -1, N)


def _segment(r, w, k, v, a, b, state, chunk: int, factored: bool):
    """The chunked recurrence over one segment (``factored``: the pair products in one matrix
    product, allowed only when ``factored_pairs_fit``).

    ``r .. b``: ``[G, T, N]`` (G = batch x heads, T a multiple of ``chunk``), ``w <= 0``;
    ``state``: ``[G, N, N]``. Returns ``y [G, T, N]`` and the state after the segment.
    """
    G = r.shape[0]
    terms = _chunk_terms(*(_to_chunk_major(x, chunk) for x in (r, w, k, v, a, b)), factored)
    S_all, U = _state_scan(terms, state, G)
    D, L, N = U.shape
    S_in = S_all[:-1].view(D, N, N)
    y = torch.baddbmm(terms.A[:, L:] @ torch.cat((U, terms.v), dim=1),
                      terms.q_start[:, 1], S_in.transpose(-1, -2))
    return _from_chunk_major(y, G), S_all[-1].clone()


def _segment_bounds(T: int, G: int, N: int, chunk: int) -> List[Tuple[int, int]]:
    step = max(1, _SEGMENT_ELEMENTS // (G * N * chunk)) * chunk
    return [(t0, min(T, t0 + step)) for t0 in range(0, T, step)]


class _ChunkedWKV7(torch.autograd.Function):
    """Segment-wise recomputation: forward keeps one state per segment; backward recomputes each
    segment's forward quantities (last segment first) and applies ``chunked_grad``'s written-out
    gradient, carrying the state gradient backwards."""

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
        G = r.shape[0]
        grads = [torch.empty_like(x) if ctx.needs_input_grad[i] else None for i, x in enumerate(inputs)]
        dstate = dstate.contiguous()
        for (t0, t1), s_in in zip(reversed(ctx.bounds), reversed(entering)):
            terms = _chunk_terms(*(_to_chunk_major(x[:, t0:t1], ctx.chunk) for x in inputs), ctx.factored)
            S_all, U = _state_scan(terms, s_in, G)
            dy_seg = _to_chunk_major(dy[:, t0:t1], ctx.chunk)
            seg_grads, dstate = segment_backward(terms, S_all, U, dy_seg, dstate, G)
            for out, gi in zip(grads, seg_grads):
                if out is not None:
                    out[:, t0:t1] = _from_chunk_major(gi, G)
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
