"""Grouping of (query, selected past chunk) pairs by key chunk, for the Triton kernels.

Each query head picks its own past chunks, so the queries of one tile rarely share them. The
kernels therefore work on pairs (MoBA style): a pair is one slot of the selection
``[B, Hq, Tq, S]`` and its id is that slot's flat index, so a query's S pairs are contiguous and
the query-side kernels find its partial results at ``id = ((b * Hq + h) * Tq + t) * S + s``.
Pairs are sorted by group ``(b, kv head, chunk)``; a tile of consecutive sorted pairs then shares
one key chunk and runs as a dense ``[tile, chunk]`` block on the matrix units.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PairGroups:
    """``pairs``: pair ids sorted by group (int32; the first ``offsets[-1]`` are valid);
    ``offsets``: ``[n_groups + 1]`` int32 bounds of each group in ``pairs``;
    ``tile_group``/``tile_start``: per tile of at most ``tile`` pairs, its group and first index."""

    pairs: torch.Tensor
    offsets: torch.Tensor
    tile_group: torch.Tensor
    tile_start: torch.Tensor
    n_groups: int
    n_past: int
    tile: int

    @property
    def n_tiles(self) -> int:
        return self.tile_group.numel()

    def tensors(self):
        return self.pairs, self.offsets, self.tile_group, self.tile_start


@torch.no_grad()
def group_pairs(selected: torch.Tensor, num_kv_heads: int, n_past: int, tile: int) -> PairGroups:
    """Sort the valid slots of ``selected`` ``[B, Hq, Tq, S]`` (chunk ids < ``n_past`` or -1)."""
    b, hq, tq, slots = selected.shape
    device = selected.device
    n_pairs = b * hq * tq * slots
    if n_pairs >= 2**31:
        raise ValueError(
            f"{n_pairs} (query, chunk) pairs exceed the kernel's int32 pair ids; split the batch "
            "or the sequence (context parallelism) so that B * Hq * Tq * (top_k - 1) < 2**31"
        )
    n_groups = b * num_kv_heads * n_past
    group = hq // num_kv_heads
    head = torch.arange(b * hq, device=device)
    base = ((head // hq) * num_kv_heads + (head % hq) // group) * n_past
    sel = selected.reshape(b * hq, tq * slots)
    # Unused slots sort after every group and are never read.
    key = torch.where(sel >= 0, sel.to(torch.int64) + base[:, None], n_groups).reshape(-1)
    _, order = torch.sort(key, stable=True)
    counts = torch.bincount(key, minlength=n_groups + 1)[:n_groups]
    offsets = torch.zeros(n_groups + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=offsets[1:])
    tiles = (counts + tile - 1) // tile
    n_tiles = int(tiles.sum())  # the one host synchronisation: it sizes the kernel grids
    tile_group = torch.repeat_interleave(
        torch.arange(n_groups, device=device), tiles, output_size=n_tiles
    )
    first_tile = torch.cumsum(tiles, 0) - tiles
    tile_start = offsets[tile_group] + (torch.arange(n_tiles, device=device) - first_tile[tile_group]) * tile
    return PairGroups(
        pairs=order.to(torch.int32),
        offsets=offsets.to(torch.int32),
        tile_group=tile_group.to(torch.int32),
        tile_start=tile_start.to(torch.int32),
        n_groups=n_groups,
        n_past=n_past,
        tile=tile,
    )
