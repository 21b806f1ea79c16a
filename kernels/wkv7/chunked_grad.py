"""The chunked backend's backward pass, written out: the gradient of one segment of the chunked
form (``chunked.py``) from its recomputed forward quantities, with no autograd graph.

Autograd through the segment's forward spent more on recording and replaying it (a node per op,
zero-filled gradients for every slice, the graph's own copies) than on the products; the backward
below is a fixed sequence of batched products over all chunks of a segment plus one reverse pass
over the chunks for the state gradient ``dS``.

Notation (chunk-major, ``D`` = chunks x batch x heads, ``L`` tokens per chunk, ``N`` head size):
queries ``(a, r)`` and keys ``(b, k)`` are stacked on dim 1; ``q_log = (g_prev, g)`` their
cumulative log-decays (exclusive for a, inclusive for r) and ``g_end`` the chunk's total.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch


class ChunkTerms(NamedTuple):
    """The state-independent quantities of a segment's chunks (what the backward reuses)."""

    queries: torch.Tensor  # [D, 2, L, N]: a, r
    keys: torch.Tensor  # [D, 2, L, N]: b, k
    q_log: torch.Tensor  # [D, 2, L, N]: g_prev, g
    v: torch.Tensor  # [D, L, N]
    q_scale: torch.Tensor  # exp(q_log - g_end) when factored, else exp(q_log)
    q_end: Optional[torch.Tensor]  # factored only: queries * exp(q_log - g_end)
    q_start: torch.Tensor  # queries * exp(q_log): decayed from the chunk start
    k_end: torch.Tensor  # keys * exp(g_end - g): decayed to the chunk end
    to_end: torch.Tensor  # [D, L, N]: exp(g_end - g)
    decay: torch.Tensor  # [D, 1, N]: exp(g_end), the chunk's whole decay
    A: torch.Tensor  # [D, 2L, 2L]: rows (a, r) x columns (b, k), masked pair products
    inverse: torch.Tensor  # [D, L, L]: (I - A_ab)^-1
    P: torch.Tensor  # [D, L, N]
    Q: torch.Tensor  # [D, L, N]


def strict_lower_mask(L: int, device) -> torch.Tensor:
    """``[2L, 2L]`` keep-mask of the pair products: a rows keep ``j < t``, r rows ``j <= t``."""
    rows = torch.arange(L, device=device)
    keep = torch.stack((rows[:, None] > rows[None, :], rows[:, None] >= rows[None, :]))  # [x, t, j]
    return keep[:, :, None, :].expand(2, L, 2, L).reshape(2 * L, 2 * L)


def _scan_backward(terms: ChunkTerms, S_in: torch.Tensor, U: torch.Tensor, dU: torch.Tensor,
                   dy: torch.Tensor, dS: torch.Tensor, G: int):
    """Reverse pass over the chunks. Forward per chunk ``c``: ``U_c = P_c + Q_c S_c^T``,
    ``S_{c+1} = S_c * decay_c + U_c^T b_end_c + V_c^T k_end_c`` and ``y_c += r_start_c S_c^T``.

    ``dU`` (from the outputs, ``[D, L, N]``) is completed in place with the scan's share, which
    is then also ``dP``. Returns ``dQ``, the gradients of the states leaving each chunk
    ``[C, G, N, N]`` and that of the state entering the segment."""
    C = S_in.shape[0] - 1
    _, L, N = U.shape
    Qc, Bc, Dc = (x.view(C, G, *x.shape[1:]) for x in (terms.Q, terms.k_end[:, 0], terms.decay))
    Rc = terms.q_start[:, 1].view(C, G, L, N)
    dUc, dyc = dU.view(C, G, L, N), dy.view(C, G, L, N)
    dQ = torch.empty_like(dUc)
    dS_out = dS.new_empty(C, G, N, N)  # dS_out[c]: gradient of the state leaving chunk c
    dS_out[C - 1] = dS
    first = dS.new_empty(G, N, N)
    for c in reversed(range(C)):
        dS_c, S_c = dS_out[c], S_in[c]
        dU_c = dUc[c].baddbmm_(Bc[c], dS_c.transpose(-1, -2))
        torch.bmm(dU_c, S_c, out=dQ[c])
        prev = dS_out[c - 1] if c > 0 else first
        torch.mul(dS_c, Dc[c], out=prev)
        prev.baddbmm_(dU_c.transpose(-1, -2), Qc[c]).baddbmm_(dyc[c].transpose(-1, -2), Rc[c])
    return dQ.view_as(U), dS_out, first


def _pair_matrices_backward(dA: torch.Tensor, queries, q_log, keys, g):
    """Gradient of ``chunked._pair_matrices`` (the exact, divide-and-conquer form) for the masked
    ``dA`` ``[D, 2L, 2L]``: returns d(queries), d(q_log), d(keys), dg (pieces of g's gradient
    through the keys' side and the split points)."""
    D, _, L, N = queries.shape
    dA6 = dA.view(D, 2, L, 2, L)
    d_queries = torch.zeros_like(queries)
    d_keys = torch.zeros_like(keys)
    d_qlog = torch.zeros_like(q_log)
    dg = torch.zeros_like(g)
    # j == t (r rows only): no decay, A[1, t, y, t] = r_t . key_y[t].
    d_diag = torch.diagonal(dA6[:, 1], dim1=1, dim2=3)  # [D, y, L]
    d_queries[:, 1] += (d_diag[..., None] * keys).sum(1)
    d_keys += d_diag[..., None] * queries[:, 1, None]
    h = 1
    while h < L:
        blocks = L // (2 * h)
        q_right = queries.view(D, 2, blocks, 2, h, N)[:, :, :, 1]
        log_right = q_log.view(D, 2, blocks, 2, h, N)[:, :, :, 1]
        key_left = keys.view(D, 2, blocks, 2, h, N)[:, :, :, 0]
        g_left = g.view(D, blocks, 2, h, N)[:, :, 0]
        g_mid = g_left[:, :, -1:]
        q_factor = torch.exp(log_right - g_mid[:, None])
        k_factor = torch.exp(g_mid - g_left)[:, None]
        q_scaled = (q_right * q_factor).transpose(1, 2).reshape(D, blocks, 2 * h, N)
        k_scaled = (key_left * k_factor).transpose(1, 2).reshape(D, blocks, 2 * h, N)
        source = dA.view(D, 2, blocks, 2, h, 2, blocks, 2, h)[:, :, :, 1, :, :, :, 0, :]
        d_prod = torch.diagonal(source, dim1=2, dim2=5).permute(0, 5, 1, 2, 3, 4).reshape(
            D, blocks, 2 * h, 2 * h
        )
        dq_scaled = (d_prod @ k_scaled).view(D, blocks, 2, h, N).transpose(1, 2)  # [D, x, block, h, N]
        dk_scaled = (d_prod.transpose(-1, -2) @ q_scaled).view(D, blocks, 2, h, N).transpose(1, 2)
        q_scaled = q_scaled.view(D, blocks, 2, h, N).transpose(1, 2)
        k_scaled = k_scaled.view(D, blocks, 2, h, N).transpose(1, 2)
        dq_log_part = dq_scaled * q_scaled
        dk_log_part = (dk_scaled * k_scaled).sum(1)  # [D, block, h, N]
        d_queries.view(D, 2, blocks, 2, h, N)[:, :, :, 1] += dq_scaled * q_factor
        d_qlog.view(D, 2, blocks, 2, h, N)[:, :, :, 1] += dq_log_part
        d_keys.view(D, 2, blocks, 2, h, N)[:, :, :, 0] += dk_scaled * k_factor
        dg_blocks = dg.view(D, blocks, 2, h, N)
        dg_blocks[:, :, 0] -= dk_log_part
        dg_blocks[:, :, 0, -1] += dk_log_part.sum(2) - dq_log_part.sum((1, 3))
        h *= 2
    return d_queries, d_qlog, d_keys, dg


def segment_backward(terms: ChunkTerms, S_in: torch.Tensor, U: torch.Tensor, dy: torch.Tensor,
                     dS: torch.Tensor, G: int) -> Tuple[Tuple[torch.Tensor, ...], torch.Tensor]:
    """Gradients of a segment (chunk-major ``[D, L, N]``) for the output gradient ``dy`` and that
    of the state leaving it, ``dS`` ``[G, N, N]``, given its forward quantities: ``S_in``
    ``[C + 1, G, N, N]`` (the states entering each chunk, then the leaving one) and ``U``.

    Returns ``(dr, dw, dk, dv, da, db)`` (chunk-major) and the gradient of the entering state."""
    D, L, N = U.shape
    v, A = terms.v, terms.A
    UV = torch.cat((U, v), dim=1)  # [D, 2L, N]: the values paired with the keys (b, k)
    A_r = A[:, L:]  # [D, L, 2L]
    # y = A_r [U; V] + r_start S^T
    dA_r = (dy @ UV.transpose(-1, -2))
    d_UV = A_r.transpose(-1, -2) @ dy
    dU, dv = d_UV[:, :L], d_UV[:, L:]
    dU = dU.contiguous()
    dQ, dS_out, dS_first = _scan_backward(terms, S_in, U, dU, dy, dS, G)
    S_c = S_in[:-1].reshape(D, N, N)
    dS_out = dS_out.view(D, N, N)
    d_r_start = dy @ S_c
    d_decay = (dS_out * S_c).sum(-2, keepdim=True)  # [D, 1, N]
    d_k_end = UV @ dS_out  # [D, 2L, N]: (b_end, k_end)
    dv = dv + terms.k_end[:, 1] @ dS_out.transpose(-1, -2)
    # [P | Q] = (I - A_ab)^-1 [A_ak V | a_start]
    d_rhs = terms.inverse.transpose(-1, -2) @ torch.cat((dU, dQ), dim=-1)
    d_rhs_P, d_a_start = d_rhs[..., :N], d_rhs[..., N:]
    dA_ab = d_rhs_P @ terms.P.transpose(-1, -2) + d_a_start @ terms.Q.transpose(-1, -2)
    dA_ak = d_rhs_P @ v.transpose(-1, -2)
    dv = dv + A[:, :L, L:].transpose(-1, -2) @ d_rhs_P
    dA = torch.cat((torch.cat((dA_ab, dA_ak), dim=-1), dA_r), dim=1)
    dA = dA * strict_lower_mask(L, dA.device)
    d_q_start = torch.stack((d_a_start, d_r_start), dim=1)
    d_k_end = d_k_end.view(D, 2, L, N)

    queries, keys, q_log = terms.queries, terms.keys, terms.q_log
    g = q_log[:, 1]
    g_end_grad = d_decay * terms.decay  # [D, 1, N]
    if terms.q_end is not None:
        # A = q_end k_end^T (masked); q_start = q_end * exp(g_end); k_end = keys * to_end.
        q_end = terms.q_end
        dq_end = (dA @ terms.k_end.view(D, 2 * L, N)).view(D, 2, L, N) + d_q_start * terms.decay[:, None]
        d_k_end = d_k_end + (dA.transpose(-1, -2) @ q_end.view(D, 2 * L, N)).view(D, 2, L, N)
        d_queries = dq_end * terms.q_scale
        d_qlog = dq_end * q_end
        # q_start's path through exp(g_end) cancels its share of q_end's through exp(-g_end).
        g_end_grad = g_end_grad + (d_q_start * terms.q_start - d_qlog).sum((1, 2))[:, None]
        d_keys = d_k_end * terms.to_end[:, None]
        dg = d_qlog[:, 1] + d_qlog[:, 0]
    else:
        d_queries, d_qlog, d_keys, dg = _pair_matrices_backward(dA, queries, q_log, keys, g)
        d_queries += d_q_start * terms.q_scale
        d_qlog += d_q_start * terms.q_start
        d_keys += d_k_end * terms.to_end[:, None]
        dg += d_qlog[:, 1] + d_qlog[:, 0]
    d_log_to_end = (d_k_end * terms.k_end).sum(1)  # [D, L, N]
    dg -= d_log_to_end
    g_end_grad = g_end_grad + d_log_to_end.sum(1, keepdim=True)
    # g = cumsum(w), g_prev = g - w, g_end = g[L - 1]
    dw = dg.flip(1).cumsum(1).flip(1) + g_end_grad - d_qlog[:, 0]
    da, dr = d_queries.unbind(1)
    db, dk = d_keys.unbind(1)
    return (dr, dw, dk, dv, da, db), dS_first
