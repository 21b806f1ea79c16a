"""Dense masked reference: the definition of top-k chunk attention, written for clarity.

It builds the full ``[B, Hq, Tq, Tk]`` score matrix, so it is for tests at small T only.
"""
from __future__ import annotations

import torch

from .selection import MEAN_SELECTION, topk_chunk_selection


def allowed_keys(
    selected: torch.Tensor, *, tq: int, tk: int, chunk_size: int, q_offset: int
) -> torch.Tensor:
    """Boolean ``[B, Hq, Tq, Tk]`` mask: the own chunk up to the query, plus the selected chunks."""
    device = selected.device
    q_pos = q_offset + torch.arange(tq, device=device)
    k_pos = torch.arange(tk, device=device)
    q_chunk = q_pos // chunk_size
    k_chunk = k_pos // chunk_size
    own = (k_chunk[None, :] == q_chunk[:, None]) & (k_pos[None, :] <= q_pos[:, None])
    mask = own[None, None].expand(selected.shape[0], selected.shape[1], tq, tk).clone()
    for slot in range(selected.shape[-1]):
        chosen = selected[..., slot]  # [B, Hq, Tq], -1 never equals a chunk index
        mask |= k_chunk.view(1, 1, 1, tk) == chosen.unsqueeze(-1)
    return mask


def topk_chunk_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int,
    top_k: int,
    scale: float,
    q_offset: int,
    selection: str = MEAN_SELECTION,
) -> torch.Tensor:
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    tk = q_offset + tq  # later keys are never visible
    k = k[:, :tk]
    v = v[:, :tk]
    _, selected = topk_chunk_selection(q, k, chunk_size=chunk_size, top_k=top_k, q_offset=q_offset,
                                       selection=selection)
    mask = allowed_keys(selected, tq=tq, tk=tk, chunk_size=chunk_size, q_offset=q_offset)

    group = hq // hkv
    qh = q.float().transpose(1, 2)  # [B, Hq, Tq, D]
    kh = k.float().transpose(1, 2).repeat_interleave(group, dim=1)  # kv head h // group
    vh = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vh)
    return out.transpose(1, 2).to(q.dtype)
