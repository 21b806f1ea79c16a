"""Top-k chunk attention in plain PyTorch without any T x T tensor (the CPU default, GPU fallback).

Two kinds of work, both in fp32 and merged through each query's log-sum-exp:

- own chunk: every query chunk against its own keys, causally, as ``[G, L, L]`` blocks (the G
  query heads that share a kv head are batched against one kv block);
- selected past chunks: the (query, past chunk) pairs are sorted by (batch, kv head, chunk), MoBA
  style, so all queries that chose one chunk form one ``[pairs, L]`` block. A selected chunk is
  complete and lies before the query, so it needs no mask.

Memory is bounded by the attended keys, ``O(B * Hq * Tq * top_k * L)``, and in practice by the
block budgets below. On the CPU the forward blocks run in PyTorch's fused flash-attention kernel;
elsewhere in plain matmuls. Backward recomputes each block from the saved log-sum-exp
(flash-attention style) instead of keeping probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .selection import MEAN_SELECTION, topk_chunk_selection

# fp32 score elements per batch of forward blocks (128 MiB), so peak memory does not grow with B * H.
_BLOCK_BUDGET = 1 << 25
# Backward score blocks (fp32 elements, 2 MiB, cache-sized) and own-chunk row blocks (queries).
# Known trade-off: on a busy machine every multi-threaded op pays a thread wake-up, and small blocks
# mean many ops (chunk 2048 at T=16K: thousands); 16 MiB blocks were ~4x faster there, at ~60 MiB
# more peak memory. Not retuned yet: see docs/benchmarks/sparse_attention.md.
_BACKWARD_BLOCK = 1 << 19
_ROW_BLOCK = 256


@dataclass
class _Geometry:
    b: int
    tq: int
    tk: int
    hq: int
    hkv: int
    d: int
    chunk: int
    q_offset: int

    @property
    def group(self) -> int:
        return self.hq // self.hkv

    @property
    def first_chunk(self) -> int:
        return self.q_offset // self.chunk

    @property
    def end_chunk(self) -> int:
        return (self.q_offset + self.tq - 1) // self.chunk + 1

    @property
    def n_own(self) -> int:
        return self.end_chunk - self.first_chunk

    @property
    def n_past(self) -> int:
        # Chunks some query may select: every chunk before the last query's chunk.
        return self.end_chunk - 1

    @property
    def pad_left(self) -> int:
        return self.q_offset - self.first_chunk * self.chunk

    @property
    def key_start(self) -> int:
        return self.first_chunk * self.chunk

    @property
    def key_stop(self) -> int:
        return min(self.end_chunk * self.chunk, self.tk)


# ---- own-chunk layout: [B, Tq, Hq, X] <-> [B * Hkv * n_own, G * L, X] ----


def _own_rows(x: torch.Tensor, geo: _Geometry, pad_value: float = 0.0) -> torch.Tensor:
    b, n, L = geo.b, geo.n_own, geo.chunk
    right = n * L - geo.pad_left - geo.tq
    x = F.pad(x, (0, 0, 0, 0, geo.pad_left, right), value=pad_value)
    x = x.view(b, n, L, geo.hkv, geo.group, -1).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b * geo.hkv * n, geo.group * L, -1)


def _own_rows_back(y: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    b, n, L = geo.b, geo.n_own, geo.chunk
    y = y.view(b, geo.hkv, n, geo.group, L, -1).permute(0, 2, 4, 1, 3, 5)
    y = y.reshape(b, n * L, geo.hq, -1)
    return y[:, geo.pad_left : geo.pad_left + geo.tq]


def _own_keys(x: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    b, n, L = geo.b, geo.n_own, geo.chunk
    x = x[:, geo.key_start : geo.key_stop]
    x = F.pad(x, (0, 0, 0, 0, 0, n * L - x.shape[1]))
    return x.reshape(b, n, L, geo.hkv, geo.d).permute(0, 3, 1, 2, 4).reshape(b * geo.hkv * n, L, geo.d)


def _own_keys_back(y: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    b, n, L = geo.b, geo.n_own, geo.chunk
    y = y.view(b, geo.hkv, n, L, geo.d).permute(0, 2, 3, 1, 4).reshape(b, n * L, geo.hkv, geo.d)
    return y[:, : geo.key_stop - geo.key_start]


def _past_keys(x: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """Complete past chunks as ``[B * Hkv * n_past, L, D]``, indexed by ``_pair_groups`` groups."""
    b, n, L = geo.b, geo.n_past, geo.chunk
    x = x[:, : n * L].reshape(b, n, L, geo.hkv, geo.d).permute(0, 3, 1, 2, 4)
    return x.reshape(b * geo.hkv * n, L, geo.d)


def _past_keys_back(y: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    b, n, L = geo.b, geo.n_past, geo.chunk
    return y.view(b, geo.hkv, n, L, geo.d).permute(0, 2, 3, 1, 4).reshape(b, n * L, geo.hkv, geo.d)


# ---- selected past chunks: (query, chunk) pairs grouped by key chunk ----


@dataclass
class _PairGroups:
    """(query, past chunk) pairs sorted by key chunk, MoBA style.

    A pair is identified by its flat index into the selection in query layout ``[B, Tq, Hq, S]``,
    so its query row (into ``q.reshape(-1, D)``) is ``pair // S``. ``pieces`` lists
    ``(group, start, stop)``: pairs ``start:stop`` of the sorted order all attend to key chunk
    ``group`` (a row of ``_past_keys``); big groups are split so one piece's scores fit the budget.
    """

    rows: torch.Tensor
    pairs: torch.Tensor
    pieces: list


@torch.no_grad()
def _pair_groups(selected_tq: torch.Tensor, geo: _Geometry) -> _PairGroups:
    device = selected_tq.device
    slots = selected_tq.shape[-1]
    flat = selected_tq.reshape(-1)
    pairs = (flat >= 0).nonzero().squeeze(1)
    if pairs.numel() == 0 or geo.n_past == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return _PairGroups(empty, empty, [])
    rows = pairs // slots
    batch = rows // (geo.tq * geo.hq)
    kv_head = (rows % geo.hq) // geo.group
    group = (batch * geo.hkv + kv_head) * geo.n_past + flat[pairs]
    # Stable: pairs keep their order inside a group, so the layout is deterministic.
    group_sorted, order = torch.sort(group, stable=True)
    counts = torch.bincount(group_sorted, minlength=geo.b * geo.hkv * geo.n_past)
    step = max(1, _BLOCK_BUDGET // geo.chunk)
    pieces = []
    start = 0
    for g, count in enumerate(counts.tolist()):
        for a in range(start, start + count, step):
            pieces.append((g, a, min(start + count, a + step)))
        start += count
    return _PairGroups(rows[order], pairs[order], pieces)


def _fused_cpu_attention(x: torch.Tensor) -> bool:
    # PyTorch's CPU flash-attention kernel returns the log-sum-exp the merge needs and keeps the
    # scores in cache; it is several times faster than the unfused math below. Its backward is
    # not used: it parallelises poorly over one head, and ours must use the merged lse anyway.
    return x.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """Softmax attention of fp32 ``q [N, G, M, D]`` to ``k, v [N, 1, L, D]``: ``(out, lse [N, G, M, 1])``.

    ``causal`` masks key j > query row r (the own chunk, M == L)."""
    if _fused_cpu_attention(q):
        kx = k.expand(-1, q.shape[1], -1, -1)
        vx = v.expand(-1, q.shape[1], -1, -1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, kx, vx, 0.0, causal, scale=scale
        )
        return out, lse.unsqueeze(-1)
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if causal:
        pos = torch.arange(k.shape[2], device=q.device)
        s.masked_fill_(pos[None, :] > pos[:, None], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    p = s.sub_(m).exp_()
    l = p.sum(dim=-1, keepdim=True)
    return torch.matmul(p, v).div_(l), m + l.log()


def _batches(total: int, per_item: int, budget: int = _BLOCK_BUDGET):
    step = max(1, budget // max(1, per_item))
    for start in range(0, total, step):
        yield start, min(total, start + step)


# ---- forward / backward ----


def _forward(qf, kf, vf, selected_tq, geo: _Geometry, scale: float, groups: _PairGroups):
    L, G, D, slots = geo.chunk, geo.group, geo.d, selected_tq.shape[-1]
    device = qf.device

    # Own chunk, causal: [N, G, L, D] queries (G heads share one kv block) against [N, 1, L, D].
    q_own = _own_rows(qf, geo).view(-1, G, L, D)
    k_own = _own_keys(kf, geo).unsqueeze(1)
    v_own = _own_keys(vf, geo).unsqueeze(1)
    o_own = torch.empty_like(q_own)
    lse_own = torch.empty(q_own.shape[:3] + (1,), device=device)
    for a, z in _batches(q_own.shape[0], G * L * L):
        o_own[a:z], lse_own[a:z] = _attend(q_own[a:z], k_own[a:z], v_own[a:z], scale, causal=True)
    o_own = o_own.view(-1, G * L, D)
    lse_own = lse_own.view(-1, G * L, 1)
    out_own = _own_rows_back(o_own, geo)  # [B, Tq, Hq, D]
    lse_own = _own_rows_back(lse_own, geo)  # [B, Tq, Hq, 1]
    if not groups.pieces:
        return out_own.contiguous(), lse_own.contiguous()

    # Selected past chunks: one [pairs, L] block per key chunk; no mask, the chunk is in the past.
    q_flat = qf.reshape(-1, D)
    k_past = _past_keys(kf, geo)
    v_past = _past_keys(vf, geo)
    n_pairs = selected_tq.numel()
    pair_out = torch.zeros(n_pairs, D, device=device)
    pair_lse = torch.full((n_pairs, 1), float("-inf"), device=device)
    for g, a, z in groups.pieces:
        q_g = q_flat.index_select(0, groups.rows[a:z])[None, None]
        o, lse = _attend(q_g, k_past[g][None, None], v_past[g][None, None], scale, causal=False)
        ids = groups.pairs[a:z]
        pair_out.index_copy_(0, ids, o[0, 0])
        pair_lse.index_copy_(0, ids, lse[0, 0])

    pair_lse = pair_lse.view(geo.b, geo.tq, geo.hq, slots)
    lse = torch.logsumexp(torch.cat([lse_own, pair_lse], dim=-1), dim=-1, keepdim=True)
    w_pair = torch.exp(pair_lse - lse).unsqueeze(-1)
    out = out_own * torch.exp(lse_own - lse)
    out = out + (pair_out.view(geo.b, geo.tq, geo.hq, slots, D) * w_pair).sum(dim=-2)
    return out, lse


def _backward(qf, kf, vf, out, lse, grad_out, geo: _Geometry, scale: float, groups: _PairGroups):
    L, G, D = geo.chunk, geo.group, geo.d
    device = qf.device
    do = grad_out.float()
    delta = (do * out).sum(dim=-1, keepdim=True)  # [B, Tq, Hq, 1]
    dk = torch.zeros(geo.b, geo.tk, geo.hkv, D, device=device)
    dv = torch.zeros_like(dk)

    # Scaling q once saves a pass over every score block; dk = scale * ds^T q = ds^T (scale q).
    qs = qf * scale

    # Own chunk, by blocks of query rows: a row block needs only the keys up to its end, which
    # skips the masked half of the chunk. Padding rows get lse = +inf, i.e. zero probability.
    q_own = _own_rows(qs, geo).view(-1, G, L, D)
    do_own = _own_rows(do, geo).view(-1, G, L, D)
    lse_own = _own_rows(lse, geo, pad_value=float("inf")).view(-1, G, L, 1)
    delta_own = _own_rows(delta, geo).view(-1, G, L, 1)
    k_own = _own_keys(kf, geo)
    v_own = _own_keys(vf, geo)
    n_units = q_own.shape[0]
    dq_own = torch.empty_like(q_own)
    dk_own = torch.zeros_like(k_own)
    dv_own = torch.zeros_like(v_own)
    row_block = min(L, _ROW_BLOCK)
    for r0 in range(0, L, row_block):
        r1 = min(L, r0 + row_block)
        rows = r1 - r0
        pos = torch.arange(r1, device=device)
        future = (pos[None, :] > pos[r0:r1, None]).repeat(G, 1)  # [G * rows, r1]
        for a, z in _batches(n_units, G * rows * r1, _BACKWARD_BLOCK):
            n = z - a
            q_b = q_own[a:z, :, r0:r1].reshape(n, G * rows, D)
            do_b = do_own[a:z, :, r0:r1].reshape(n, G * rows, D)
            k_b = k_own[a:z, :r1]
            v_b = v_own[a:z, :r1]
            s = torch.bmm(q_b, k_b.transpose(1, 2)).masked_fill_(future, float("-inf"))
            p = s.sub_(lse_own[a:z, :, r0:r1].reshape(n, G * rows, 1)).exp_()
            dv_own[a:z, :r1] += torch.bmm(p.transpose(1, 2), do_b)
            ds = torch.bmm(do_b, v_b.transpose(1, 2))
            ds.sub_(delta_own[a:z, :, r0:r1].reshape(n, G * rows, 1)).mul_(p)
            dq_own[a:z, :, r0:r1] = torch.bmm(ds, k_b).mul_(scale).view(n, G, rows, D)
            dk_own[a:z, :r1] += torch.bmm(ds.transpose(1, 2), q_b)
    dq_own = dq_own.view(-1, G * L, D)
    dq = _own_rows_back(dq_own, geo).contiguous()
    dk[:, geo.key_start : geo.key_stop] += _own_keys_back(dk_own, geo)
    dv[:, geo.key_start : geo.key_stop] += _own_keys_back(dv_own, geo)
    if not groups.pieces:
        return dq, dk, dv

    # Selected past chunks.
    q_flat = qs.reshape(-1, D)
    do_flat = do.reshape(-1, D)
    lse_flat = lse.reshape(-1, 1)
    delta_flat = delta.reshape(-1, 1)
    dq_flat = dq.view(-1, D)
    k_past = _past_keys(kf, geo)
    v_past = _past_keys(vf, geo)
    dk_past = torch.zeros_like(k_past)
    dv_past = torch.zeros_like(v_past)
    step = max(1, _BACKWARD_BLOCK // L)
    for g, a0, z0 in groups.pieces:
        k_g, v_g = k_past[g], v_past[g]
        for a in range(a0, z0, step):
            rows = groups.rows[a : min(z0, a + step)]
            q_g = q_flat.index_select(0, rows)
            do_g = do_flat.index_select(0, rows)
            p = torch.mm(q_g, k_g.t()).sub_(lse_flat.index_select(0, rows)).exp_()
            dv_past[g].addmm_(p.t(), do_g)
            ds = torch.mm(do_g, v_g.t()).sub_(delta_flat.index_select(0, rows)).mul_(p)
            # index_put_(accumulate) rather than index_add_: on the CPU the latter takes a path
            # whose cost grows with the size of dq, not with the rows added.
            dq_flat.index_put_((rows,), torch.mm(ds, k_g).mul_(scale), accumulate=True)
            dk_past[g].addmm_(ds.t(), q_g)
    n = geo.n_past * L
    dk[:, :n] += _past_keys_back(dk_past, geo)
    dv[:, :n] += _past_keys_back(dv_past, geo)
    return dq, dk, dv


class _TopkChunkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, selected, chunk_size, scale, q_offset):
        b, tq, hq, d = q.shape
        geo = _Geometry(b, tq, k.shape[1], hq, k.shape[2], d, chunk_size, q_offset)
        selected_tq = selected.permute(0, 2, 1, 3).contiguous()  # [B, Tq, Hq, S]
        groups = _pair_groups(selected_tq, geo)
        qf, kf, vf = q.float(), k.float(), v.float()
        out, lse = _forward(qf, kf, vf, selected_tq, geo, scale, groups)
        ctx.save_for_backward(q, k, v, out, lse, groups.rows, groups.pairs)
        ctx.geo, ctx.scale, ctx.pieces = geo, scale, groups.pieces
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, rows, pairs = ctx.saved_tensors
        groups = _PairGroups(rows, pairs, ctx.pieces)
        dq, dk, dv = _backward(
            q.float(), k.float(), v.float(), out, lse, grad_out, ctx.geo, ctx.scale, groups
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def topk_chunk_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int,
    top_k: int,
    scale: float,
    q_offset: int,
    selected: torch.Tensor | None = None,
    selection: str = MEAN_SELECTION,
) -> torch.Tensor:
    """Efficient PyTorch path. ``selected`` (from ``topk_chunk_selection``) may be passed in when the
    caller already has it; ``selection`` is the rule that computes it otherwise."""
    if selected is None:
        _, selected = topk_chunk_selection(q, k, chunk_size=chunk_size, top_k=top_k, q_offset=q_offset,
                                           selection=selection)
    else:
        expected = (q.shape[0], q.shape[2], q.shape[1], top_k - 1)
        if tuple(selected.shape) != expected or selected.dtype != torch.long:
            raise ValueError(
                f"selected must be an int64 tensor of shape [B, Hq, Tq, top_k-1] = {expected}, got "
                f"{selected.dtype} {tuple(selected.shape)}; build it with topk_chunk_selection"
            )
        last_chunk = (q_offset + q.shape[1] - 1) // chunk_size
        if selected.numel() and (selected.min() < -1 or selected.max() >= last_chunk):
            raise ValueError(
                f"selected holds chunk indices outside [-1, {last_chunk}): a query may only select "
                "complete chunks before its own; build it with topk_chunk_selection"
            )
    return _TopkChunkAttention.apply(q, k, v, selected, chunk_size, scale, q_offset)
