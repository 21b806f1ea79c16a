"""Grouping of (query, selected past chunk) pairs by key chunk, for the Triton kernels.

Each query head picks its own past chunks, so the queries of one tile rarely share them. The
kernels therefore work on pairs (MoBA style): a pair is one slot of the selection
``[B, Hq, Tq, S]`` and its id is that slot's flat index, so a query's S pairs are contiguous and
the query-side kernels find its partial results at ``id = ((b * Hq + h) * Tq + t) * S + s``.
Pairs are sorted by group ``(b, kv head, chunk)``; a tile of consecutive sorted pairs then shares
one key chunk and runs as a dense ``[tile, chunk]`` block on the matrix units.

Everything here stays on the device: the number of tiles depends on the selection, so the pair
kernels are launched on an upper bound of it (``max_tiles``) and the spare programs, whose
``tile_group`` is -1, exit at once. Reading the exact count back would
stall the host once per call until the selection is done.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PairGroups:
    """``pairs``: pair ids sorted by group (int32; the first ``offsets[-1]`` are valid);
    ``offsets``: ``[n_groups + 1]`` int32 bounds of each group in ``pairs``;
    ``tile_group``/``tile_start``: ``[max_tiles]`` int32, per tile of at most ``tile`` pairs its
    group (-1 for a spare tile) and its first index in ``pairs``."""

    pairs: torch.Tensor
    offsets: torch.Tensor
    tile_group: torch.Tensor
    tile_start: torch.Tensor
    n_groups: int
    n_past: int
    tile: int

    @property
    def max_tiles(self) -> int:
        """Programs to launch for the pair kernels (the real tiles and the spare ones)."""
        return self.tile_group.numel()

    def tensors(self):
        return self.pairs, self.offsets, self.tile_group, self.tile_start


def max_tiles(n_pairs: int, n_groups: int, tile: int) -> int:
    """Upper bound of ``sum_g ceil(count_g / tile)`` over groups whose counts sum to at most
    ``n_pairs``: each group wastes less than one tile."""
    return n_pairs // tile + n_groups if n_pairs else 0


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
    head = torch.arange(b * hq, device=device, dtype=torch.int32)
    base = ((head // hq) * num_kv_heads + (head % hq) // group) * n_past
    sel = selected.reshape(b * hq, tq * slots).to(torch.int32)
    # Unused slots get the key n_groups: they sort after every group and are never read. int32
    # keys (n_groups < 2**31 since it is at most n_pairs) halve the radix sort's passes.
    key = torch.where(sel >= 0, sel + base[:, None], n_groups).reshape(-1)
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(n_groups + 1, device=device, dtype=torch.int32)
    offsets = torch.searchsorted(sorted_key, bounds, out_int32=True)  # first index of each group
    counts = (offsets[1:] - offsets[:-1]).to(torch.int64)
    tiles_end = torch.cumsum((counts + tile - 1) // tile, 0)  # inclusive: tiles of groups <= g
    n_tiles = max_tiles(n_pairs, n_groups, tile)
    tile_ids = torch.arange(n_tiles, device=device, dtype=torch.int64)
    # Tile i belongs to the first group whose inclusive tile count exceeds i (n_groups past the
    # real tiles: a spare tile).
    tile_group = torch.searchsorted(tiles_end, tile_ids, right=True)
    first_tile = torch.cat((tiles_end.new_zeros(1), tiles_end))  # tiles before group g
    tile_start = offsets.to(torch.int64)[tile_group] + (tile_ids - first_tile[tile_group]) * tile
    spare = tile_group == n_groups
    tile_group = torch.where(spare, -1, tile_group)
    tile_start = torch.where(spare, 0, tile_start)
    return PairGroups(
        pairs=order.to(torch.int32),
        offsets=offsets,
        tile_group=tile_group.to(torch.int32),
        tile_start=tile_start.to(torch.int32),
        n_groups=n_groups,
        n_past=n_past,
        tile=tile,
    )
