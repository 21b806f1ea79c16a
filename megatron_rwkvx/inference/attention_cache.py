"""Key/value cache of one sparse-attention layer, kept by chunks, and its exact decode attention.

Layout: keys and values are ``[B, Hkv, slots, chunk_size, D]`` (head-major), so one head's chunk is
one contiguous ``[chunk_size, D]`` block that a decode step reads sequentially (the earlier
``[B, slots, chunk_size, Hkv, D]`` layout spread it as D floats every ``Hkv * D``: reads 2-2.5x slower).
Per batch row, slots ``0 .. complete-1`` hold the complete past chunks in increasing chunk order,
slot ``complete`` the chunk being filled. When a
chunk fills, its fp32 selection key (its mean key, or with ``selection="quest"`` its key maxima and
minima) is computed once with the training code's ``chunk_selection_keys``, so a decode step only
scores the stored keys (one dot product per chunk and head) and attends ``top_k`` chunks: its cost
does not grow with the context beyond that score vector.

Without a cap, slot ``i`` is chunk ``i`` and a query at position ``p`` sees exactly what training
shows it (same scores, same tie-breaking to the lower chunk index). With ``max_chunks``, the
complete chunk selected least often (ties: the oldest; never the one just completed) is dropped
when one more completes; the
slots stay in chunk order, so the selection among the chunks kept is still the training rule.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch

from megatron_rwkvx.kernels.sparse_attention import (
    MEAN_SELECTION,
    best_chunk_slots,
    check_selection,
    chunk_selection_keys,
    selection_key_width,
    selection_queries,
    topk_chunk_attention,
    topk_chunk_selection,
)


def _no_torch_function():
    # The per-head loop below is ~20 small ops per head; a process-wide TorchFunctionMode (the CPU
    # runtime shim's) would add tens of microseconds to each. Nothing here creates tensors on a
    # device or calls .cuda(), which is all that mode rewrites.
    disable = getattr(torch._C, "DisableTorchFunction", None)
    return disable() if disable is not None else contextlib.nullcontext()


class ChunkedKVCache:
    def __init__(
        self,
        batch_size: int,
        kv_heads: int,
        head_size: int,
        *,
        chunk_size: int,
        top_k: int,
        dtype: torch.dtype,
        device: torch.device,
        max_chunks: Optional[int] = None,
        initial_slots: int = 1,
        selection: str = MEAN_SELECTION,
    ) -> None:
        if max_chunks is not None and max_chunks < max(top_k - 1, 1):
            raise ValueError(
                f"max_chunks={max_chunks} cannot hold the top_k - 1 = {top_k - 1} past chunks a "
                f"query selects; use max_chunks >= {max(top_k - 1, 1)} or None (no cap)"
            )
        self.chunk_size = chunk_size
        self.top_k = top_k
        self.selection = check_selection(selection)
        self.max_chunks = max_chunks
        self.kv_heads = kv_heads
        self.head_size = head_size
        slots = initial_slots if max_chunks is None else min(initial_slots, max_chunks + 1)
        shape = (batch_size, kv_heads, slots, chunk_size, head_size)  # head-major: see the docstring
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.selection_keys = torch.zeros(batch_size, slots, kv_heads, selection_key_width(head_size, selection),
                                          dtype=torch.float32, device=device)
        self.chunk_ids = torch.full((batch_size, slots), -1, dtype=torch.long, device=device)
        # How often each stored chunk was selected (summed over heads and queries): eviction order.
        self.selected_count = torch.zeros(batch_size, slots, dtype=torch.long, device=device)
        self.lengths: List[int] = [0] * batch_size  # tokens seen per row
        self.complete: List[int] = [0] * batch_size  # complete chunks stored per row

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.keys, self.values, self.selection_keys, self.chunk_ids, self.selected_count))

    # ----------------------------------------------------------------------------------- storage
    def _ensure_slots(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new = max(needed, 2 * self.capacity)
        if self.max_chunks is not None:
            new = min(new, self.max_chunks + 1)

        def grow(t: torch.Tensor, fill, dim: int = 1) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = new
            out = t.new_full(shape, fill)
            out.narrow(dim, 0, t.shape[dim]).copy_(t)
            return out

        self.keys = grow(self.keys, 0, dim=2)
        self.values = grow(self.values, 0, dim=2)
        self.selection_keys = grow(self.selection_keys, 0)
        self.chunk_ids = grow(self.chunk_ids, -1)
        self.selected_count = grow(self.selected_count, 0)

    def _sequence(self, t: torch.Tensor, row: int, end: int) -> torch.Tensor:
        """Positions ``0 .. end-1`` of ``row`` (chunk ``i`` = slot ``i``) as a ``[1, end, Hkv, D]``
        view of the head-major storage (strided: the heads are the outer dimension)."""
        slots = -(-end // self.chunk_size)
        flat = t[row, :, :slots].reshape(self.kv_heads, slots * self.chunk_size, self.head_size)
        return flat[:, :end].transpose(0, 1).unsqueeze(0)

    def _advance(self, row: int, count: int) -> None:
        """Account ``count`` new tokens of ``row`` (already written); close its chunk if it filled."""
        self.lengths[row] += count
        if self.lengths[row] % self.chunk_size:
            return
        slot = self.complete[row]
        chunk = self.keys[row, :, slot].transpose(0, 1).unsqueeze(0).contiguous()  # [1, cs, Hkv, D]
        self.selection_keys[row, slot] = chunk_selection_keys(chunk, self.chunk_size, 1, self.selection)[0, 0]
        self.chunk_ids[row, slot] = self.lengths[row] // self.chunk_size - 1
        self.complete[row] += 1
        if self.max_chunks is not None and self.complete[row] > self.max_chunks:
            self._evict(row)

    def _evict(self, row: int) -> None:
        n = self.complete[row]
        # The chunk that just completed has not been selectable yet; it is never the victim.
        victim = int(self.selected_count[row, : n - 1].argmin())  # first minimum: the oldest
        for t in (self.keys, self.values):  # [B, Hkv, slots, ...]
            t[row, :, victim : n - 1] = t[row, :, victim + 1 : n].clone()
        for t in (self.selection_keys, self.chunk_ids, self.selected_count):  # [B, slots, ...]
            t[row, victim : n - 1] = t[row, victim + 1 : n].clone()
        self.chunk_ids[row, n - 1] = -1
        self.selected_count[row, n - 1] = 0
        self.complete[row] = n - 1

    def stored_chunk_ids(self, row: int) -> List[int]:
        return self.chunk_ids[row, : self.complete[row]].tolist()

    # ----------------------------------------------------------------------------------- attention
    def attend_prefill(self, row: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float, backend: str = "auto") -> torch.Tensor:
        """Append ``k, v`` ([L, Hkv, D]) to ``row`` and attend its queries ``q`` ([L, Hq, D]).

        The piece is cut at chunk boundaries; each part runs the training operator on the stored
        chunks (as one sequence: stored chunk ``i`` at positions ``i*B ..``), so any piece length
        gives the training result, and a cap's eviction happens exactly where decoding does it.
        """
        outs = []
        cs = self.chunk_size
        i, total = 0, q.shape[0]
        while i < total:
            offset = self.lengths[row] % cs
            take = min(cs - offset, total - i)
            slot = self.complete[row]
            self._ensure_slots(slot + 1)
            self.keys[row, :, slot, offset : offset + take] = k[i : i + take].transpose(0, 1)
            self.values[row, :, slot, offset : offset + take] = v[i : i + take].transpose(0, 1)
            end = slot * cs + offset + take
            # Keys as a contiguous copy (O(end), like the operator's own work on this part): the
            # chunk means are then reduced in the training layout's order, bit for bit (a strided
            # view can round them differently). Values stay a view: every backend re-lays them
            # out itself (torch: head-major blocks, which this view already is; reference:
            # repeat_interleave; Triton: .contiguous()), so the result is the same.
            k_seq = self._sequence(self.keys, row, end).contiguous()
            v_seq = self._sequence(self.values, row, end)
            q_part = q[None, i : i + take]
            outs.append(topk_chunk_attention(
                q_part, k_seq, v_seq, chunk_size=cs, top_k=self.top_k, scale=scale,
                q_offset=slot * cs + offset, backend=backend, selection=self.selection,
            )[0])
            if self.max_chunks is not None and slot > 0 and self.top_k > 1:
                _, selected = topk_chunk_selection(q_part, k_seq, chunk_size=cs, top_k=self.top_k,
                                                   q_offset=slot * cs + offset, selection=self.selection)
                chosen = selected[selected >= 0]
                self.selected_count[row].index_add_(0, chosen, torch.ones_like(chosen))
            self._advance(row, take)
            i += take
        return torch.cat(outs, dim=0)

    def attend_decode(self, rows: Sequence[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float) -> torch.Tensor:
        """One new token per row: q ``[R, Hq, D]``, k/v ``[R, Hkv, D]`` -> ``[R, Hq, D]``.

        Rows may sit at different positions. Cost: scores against the stored chunk keys, then
        attention over ``top_k`` chunks; nothing proportional to the context is recomputed.
        """
        cs, slots_sel = self.chunk_size, self.top_k - 1
        device = q.device
        r_count, hq, d = q.shape
        hkv = self.kv_heads
        g = hq // hkv
        self._ensure_slots(max(self.complete[r] for r in rows) + 1)
        ridx = torch.tensor(list(rows), device=device)
        own = torch.tensor([self.complete[r] for r in rows], device=device)
        offset = torch.tensor([self.lengths[r] % cs for r in rows], device=device)
        # Advanced indices around a slice: the indexed shape is [R, Hkv, D], as k and v are.
        self.keys[ridx, :, own, offset] = k.to(self.keys.dtype)
        self.values[ridx, :, own, offset] = v.to(self.values.dtype)

        qf = q.float().view(r_count, hkv, g, d)
        sel_lists = None
        n = max(self.complete[r] for r in rows)
        if slots_sel > 0 and n > 0:
            n_past = own  # every stored complete chunk lies before the current one
            keys_t = self.selection_keys[ridx, :n].permute(0, 2, 3, 1).unsqueeze(2)  # [R, Hkv, 1, D', n]
            q_sel = selection_queries(qf, self.selection)  # [R, Hkv, G, D']
            scores = torch.matmul(q_sel.unsqueeze(3), keys_t).squeeze(3)  # [R, Hkv, G, n]
            slot_ids = torch.arange(n, device=device)
            scores.masked_fill_((slot_ids[None, :] >= n_past[:, None])[:, None, None, :], float("-inf"))
            sel = best_chunk_slots(scores, n_past[:, None, None], slots_sel)  # [R, Hkv, G, S]
            if self.max_chunks is not None:
                valid = sel >= 0
                rr = ridx[:, None, None, None].expand_as(sel)
                self.selected_count.index_put_((rr[valid], sel[valid]), torch.ones_like(sel[valid]),
                                               accumulate=True)
            sel_lists = sel.tolist()

        # Per row and query head, on views of the cache (each a contiguous [chunk, D] block): the
        # selected chunks are read once, never gathered into a copy (that copy would cost more
        # than the attention itself).
        out = torch.empty(r_count, hkv, g, d, dtype=torch.float32, device=device)
        with _no_torch_function():
            self._attend_rows(rows, qf, sel_lists, scale, out)
        for r in rows:
            self._advance(r, 1)
        return out.view(r_count, hq, d).to(q.dtype)

    def _attend_rows(self, rows, qf, sel_lists, scale, out) -> None:
        cs, hkv, g = self.chunk_size, self.kv_heads, qf.shape[2]
        for i, r in enumerate(rows):
            slot, off = self.complete[r], self.lengths[r] % cs
            for h in range(hkv):
                kh, vh = self.keys[r, h], self.values[r, h]  # [slots, cs, D]: each chunk contiguous
                k_own = kh[slot, : off + 1]  # [off+1, D] view
                v_own = vh[slot, : off + 1]
                for j in range(g):
                    chunks = [c for c in sel_lists[i][h][j] if c >= 0] if sel_lists else []
                    ks = [kh[c] for c in chunks] + [k_own]
                    vs = [vh[c] for c in chunks] + [v_own]
                    qv = qf[i, h, j]
                    logits = torch.cat([torch.mv(kk.float(), qv) for kk in ks]) * scale
                    probs = torch.softmax(logits, dim=0)
                    acc, at = None, 0
                    for vv in vs:
                        part = torch.mv(vv.float().t(), probs[at : at + vv.shape[0]])
                        acc = part if acc is None else acc + part
                        at += vv.shape[0]
                    out[i, h, j] = acc
