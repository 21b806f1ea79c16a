"""Chunk-mean keys and the top-k chunk selection shared by every backend.

The selection decides which keys a query may see, so two implementations that select differently
give different outputs, not merely rounding differences. Every backend (the dense reference, the
chunked PyTorch path, the Triton kernel, inference and context parallelism) therefore calls these
functions, or reproduces them exactly:

- chunk ``i`` covers positions ``[i * chunk_size, (i + 1) * chunk_size)``, aligned to position 0;
- its key is the fp32 mean of its keys, per kv head (``chunk_mean_keys``; the reference's and
  MoBA's rule, ``selection="mean"``);
- a query at position ``p`` in chunk ``c = p // chunk_size`` scores only the complete chunks
  ``i < c`` with ``s_i = q . key_i`` in fp32, unscaled, using kv head ``h // (Hq // Hkv)``;
- ``selection="quest"`` (not in the reference) scores a chunk by Quest's bound instead, the
  largest score any one of its keys can reach: ``sum_d max(q_d * max_d, q_d * min_d)`` over the
  chunk's elementwise key maximum and minimum. It is computed as the same dot product between
  ``selection_queries(q) = [relu(q), min(q, 0)]`` and ``chunk_selection_keys(k) = [max, min]``
  (width ``2 * D``), so every backend scores and ranks both rules with one code path. Why: one
  key is ``1 / chunk_size`` of a mean, so a chunk holding a single key that matches the query can
  score below chunks of many middling keys (docs/retrieval_study.md, findings 6, 15 and 21);
- it keeps the ``top_k - 1`` best of them in slots ordered by descending score; **equal scores go
  to the lower chunk index** (``torch.argmax`` returns the first maximum, Triton's
  ``tl.argmax(..., tie_break_left=True)`` does the same); unused slots hold ``-1``.

A Triton port must compute the scores in true fp32 (``input_precision="ieee"``, not tf32),
otherwise near-ties are decided differently from this code.
"""
from __future__ import annotations

from typing import Tuple

import torch

# Score rows handled at once: bounds the [rows, n_chunks] fp32 score buffer (256 MiB).
_SCORE_BUDGET = 1 << 26

MEAN_SELECTION, QUEST_SELECTION = "mean", "quest"
SELECTION_RULES = (MEAN_SELECTION, QUEST_SELECTION)


def check_selection(selection: str) -> str:
    if selection not in SELECTION_RULES:
        raise ValueError(
            f"sparse chunk selection must be one of {', '.join(SELECTION_RULES)}, got {selection!r}"
        )
    return selection


def _chunks_to_summarise(k: torch.Tensor, chunk_size: int, num_chunks: int | None) -> int:
    """``num_chunks``, checked against ``k [B, Tk, Hkv, D]`` (default: every complete chunk); asking
    for more than ``k`` completes raises, because a partial chunk never takes part in the selection."""
    if k.dim() != 4:
        raise ValueError(f"k must be [B, T, H_kv, D], got shape {tuple(k.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    complete = k.shape[1] // chunk_size
    if num_chunks is None:
        return complete
    if num_chunks > complete:
        raise ValueError(
            f"asked for {num_chunks} chunk keys but k has only {complete} complete chunks of "
            f"{chunk_size} (T={k.shape[1]}); pass at least num_chunks * chunk_size keys"
        )
    return num_chunks


def chunk_mean_keys(k: torch.Tensor, chunk_size: int, num_chunks: int | None = None) -> torch.Tensor:
    """fp32 mean key of each complete chunk: ``[B, num_chunks, Hkv, D]`` from k ``[B, Tk, Hkv, D]``
    (``num_chunks``: see ``_chunks_to_summarise``)."""
    num_chunks = _chunks_to_summarise(k, chunk_size, num_chunks)
    b, _, h, d = k.shape
    used = k[:, : num_chunks * chunk_size].float()
    return used.reshape(b, num_chunks, chunk_size, h, d).mean(dim=2)


def selection_key_width(head_size: int, selection: str = MEAN_SELECTION) -> int:
    """The width of ``chunk_selection_keys`` and ``selection_queries`` for heads of ``head_size``."""
    return head_size if check_selection(selection) == MEAN_SELECTION else 2 * head_size


def chunk_selection_keys(
    k: torch.Tensor, chunk_size: int, num_chunks: int | None = None, selection: str = MEAN_SELECTION
) -> torch.Tensor:
    """The fp32 keys that ``select_chunks`` scores each complete chunk by: its mean key
    ``[B, n, Hkv, D]`` (``mean``), or its elementwise key maximum and minimum side by side
    ``[B, n, Hkv, 2D]`` (``quest``). Score them against ``selection_queries(q, selection)``."""
    if check_selection(selection) == MEAN_SELECTION:
        return chunk_mean_keys(k, chunk_size, num_chunks)
    num_chunks = _chunks_to_summarise(k, chunk_size, num_chunks)
    b, _, h, d = k.shape
    used = k[:, : num_chunks * chunk_size].reshape(b, num_chunks, chunk_size, h, d)
    # max/min are exact in k's dtype, so they are taken before the fp32 cast (no fp32 copy of k).
    return torch.cat([used.amax(dim=2), used.amin(dim=2)], dim=-1).float()


def selection_queries(q: torch.Tensor, selection: str = MEAN_SELECTION) -> torch.Tensor:
    """The queries that score ``chunk_selection_keys``: ``q`` itself (``mean``), or
    ``[relu(q), min(q, 0)]`` in fp32 (``quest``): its dot product with ``[max, min]`` is
    ``sum_d max(q_d * max_d, q_d * min_d)``, Quest's bound."""
    if check_selection(selection) == MEAN_SELECTION:
        return q
    qf = q.float()
    return torch.cat([qf.clamp(min=0), qf.clamp(max=0)], dim=-1)


@torch.no_grad()
def best_chunk_slots(scores: torch.Tensor, n_past: torch.Tensor, slots: int) -> torch.Tensor:
    """The ``min(slots, n)`` best chunks of ``scores [..., n]`` (``-inf`` where not selectable), in
    slots of descending score, ties to the lower chunk index; slot ``s`` holds ``-1`` where
    ``n_past <= s`` (``n_past`` broadcasts against ``scores.shape[:-1]``). ``scores`` is consumed:
    each chunk taken is set to ``-inf`` in place."""
    chosen = []
    for slot in range(min(slots, scores.shape[-1])):
        best = scores.argmax(dim=-1)  # first maximum: ties go to the lower chunk index
        chosen.append(torch.where(slot < n_past, best, -1))
        scores.scatter_(-1, best.unsqueeze(-1), float("-inf"))
    return torch.stack(chosen, dim=-1)


@torch.no_grad()
def select_chunks(
    q: torch.Tensor,
    chunk_keys: torch.Tensor,
    *,
    chunk_size: int,
    top_k: int,
    q_offset: int = 0,
) -> torch.Tensor:
    """Indices of the past chunks each query attends to besides its own: ``[B, Hq, Tq, top_k-1]``.

    ``q`` is ``[B, Tq, Hq, D]`` at positions ``q_offset .. q_offset + Tq - 1``; ``chunk_keys`` is
    ``[B, n, Hkv, D]`` (from ``chunk_mean_keys``) and must cover every chunk that ends before the
    last query. For another rule pass ``selection_queries(q, rule)`` and
    ``chunk_selection_keys(k, ..., rule)``. Slots are ordered by
    descending score, ties to the lower chunk index, ``-1`` where fewer past chunks exist.
    """
    if q.dim() != 4 or chunk_keys.dim() != 4:
        raise ValueError(
            f"q must be [B, Tq, Hq, D] and chunk_keys [B, n, Hkv, D], got {tuple(q.shape)} and "
            f"{tuple(chunk_keys.shape)}"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 (the own chunk counts as one), got {top_k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if q_offset < 0:
        raise ValueError(f"q_offset must be >= 0, got {q_offset}")
    b, tq, hq, d = q.shape
    hkv = chunk_keys.shape[2]
    if chunk_keys.shape[0] != b or chunk_keys.shape[3] != d:
        raise ValueError(
            f"chunk_keys {tuple(chunk_keys.shape)} does not match q {tuple(q.shape)} in batch or "
            "head size"
        )
    if hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of kv heads ({hkv}) for grouped-query attention"
        )
    slots = top_k - 1
    out = torch.full((b, hq, tq, slots), -1, dtype=torch.long, device=q.device)
    if slots == 0 or tq == 0:
        return out
    last_chunk = (q_offset + tq - 1) // chunk_size
    if chunk_keys.shape[1] < last_chunk:
        raise ValueError(
            f"chunk_keys holds {chunk_keys.shape[1]} chunks but the last query (position "
            f"{q_offset + tq - 1}) can select among {last_chunk}; pass the keys of every chunk "
            "before the last query's chunk"
        )
    n = last_chunk
    if n == 0:
        return out

    g = hq // hkv
    # [B, Hkv, G, Tq, D] so that query head h = hkv * G + g meets kv head hkv in one matmul.
    qf = q.float().reshape(b, tq, hkv, g, d).permute(0, 2, 3, 1, 4)
    keys_t = chunk_keys[:, :n].float().permute(0, 2, 3, 1).unsqueeze(2)  # [B, Hkv, 1, D, n]
    past = (q_offset + torch.arange(tq, device=q.device)) // chunk_size  # complete chunks before
    chunk_ids = torch.arange(n, device=q.device)
    rows = max(1, _SCORE_BUDGET // max(1, b * hq * n))
    out_view = out.view(b, hkv, g, tq, slots)
    for start in range(0, tq, rows):
        stop = min(tq, start + rows)
        scores = torch.matmul(qf[:, :, :, start:stop], keys_t)  # [B, Hkv, G, rows, n]
        n_past = past[start:stop]
        scores.masked_fill_(chunk_ids[None, :] >= n_past[:, None], float("-inf"))
        out_view[:, :, :, start:stop, : min(slots, n)] = best_chunk_slots(scores, n_past, slots)
    return out


def topk_chunk_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    chunk_size: int,
    top_k: int,
    q_offset: int = 0,
    selection: str = MEAN_SELECTION,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(chunk_keys, selected [B, Hq, Tq, top_k-1])`` for queries ``q`` at ``q_offset`` against
    keys ``k`` covering positions ``0 .. Tk-1``; ``chunk_keys`` as ``chunk_selection_keys``."""
    with torch.no_grad():
        tq = q.shape[1]
        n = (q_offset + tq - 1) // chunk_size if tq > 0 else 0
        keys = chunk_selection_keys(k.detach(), chunk_size, n, selection)
        selected = select_chunks(selection_queries(q.detach(), selection), keys, chunk_size=chunk_size,
                                 top_k=top_k, q_offset=q_offset)
    return keys, selected
