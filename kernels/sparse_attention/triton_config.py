"""Block sizes of the sparse-attention Triton kernels: the fixed ones and the GPU autotune sets.

The interpreter (``TRITON_INTERPRET=1``, CPU tensors) runs every program in numpy at a cost per
op, not per element, so it gets few large blocks. On a GPU, bf16/fp16 launches autotune over the
sets of ``tuned_configs`` (``kernels/triton_launch.py``): every configuration there compiles for
sm_90 without register spills under triton 3.6-3.9 (``triton_compile_check``; a test checks the
installed one). The sets lie around the first guess (``blocks_for``) and the tiles of
flash-attention kernels for Hopper (128-query forward tiles, 128-key dk/dv blocks with 32-row
query steps). fp32 inputs (a checking path) and head sizes above 128 launch the fixed blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import triton

from ..triton_launch import INTERPRETED  # noqa: F401  (re-exported for the backend and tests)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch options of each kernel family.

    ``m``: query rows (or pairs) per tile of the forward and dq kernels; the pair list is cut into
    tiles of ``m``, shared by the forward and the dq pass. ``n``: keys per block streamed there.
    ``kv_n`` keys per dk/dv program, streamed against ``kv_m`` query rows at a time.
    """

    m: int
    n: int
    warps: int
    stages: int
    kv_n: int
    kv_m: int
    kv_warps: int
    dq_n: int
    dq_warps: int
    bwd_stages: int = 2


def blocks_for(head_dim: int, dtype_bytes: int, interpreted: bool = INTERPRETED) -> Blocks:
    if interpreted:
        # Each interpreted op costs about the same whatever its size: fewer, larger tiles win.
        return Blocks(32, 32, 1, 1, 32, 32, 1, 32, 1, 1)
    if dtype_bytes == 4:
        # Exact fp32 dots run on the FMA units; small tiles keep them out of local memory (at
        # head size 128 the own-chunk forward still spills ~300 bytes: fp32 is for checks).
        if head_dim <= 64:
            return Blocks(32, 32, 4, 2, 32, 32, 8, 32, 4)
        return Blocks(32, 32, 8, 2, 32, 16, 8, 32, 8)
    if head_dim <= 64:
        return Blocks(64, 64, 4, 3, 64, 32, 4, 64, 4)
    return Blocks(64, 64, 8, 2, 64, 32, 8, 32, 8)


def _cfg(warps: int, stages: int, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


def fixed_configs(b: Blocks) -> Dict[str, triton.Config]:
    """The fixed launch of each kernel family (interpreter, fp32, no autotuning). The pair
    kernels' query tile is the pair tile chosen when the pairs are grouped, so it is not here."""
    return {
        "own_forward": _cfg(b.warps, b.stages, BM=b.m, BN=b.n),
        "pair_forward": _cfg(b.warps, b.stages, BN=b.n),
        "dkdv": _cfg(b.kv_warps, b.bwd_stages, BM=b.kv_m, BN=b.kv_n),
        "pair_dq": _cfg(b.dq_warps, b.bwd_stages, BN=b.dq_n),
        "own_dq": _cfg(b.dq_warps, b.bwd_stages, BM=b.m, BN=b.dq_n),
    }


# (warps, stages, blocks) per kernel family and padded head size; each compiles for sm_90
# without spills in bf16 (pair kernels at pair tiles 64 and 128) under triton 3.6.0, 3.7.1, 3.8.0
# and 3.9.0: tiles at 254-255 registers spill on some of them. The first entry of each list is
# the fixed launch of ``blocks_for``.
_TUNED = {
    64: {
        "own_forward": [(4, 3, 64, 64), (8, 2, 128, 64), (8, 3, 128, 64), (8, 3, 128, 128), (4, 3, 64, 128)],
        "pair_forward": [(4, 3, 64), (8, 3, 128), (8, 3, 64), (8, 2, 128)],
        "dkdv": [(4, 2, 32, 64), (8, 2, 32, 128), (8, 3, 32, 64), (8, 2, 16, 128), (8, 3, 16, 128), (4, 2, 16, 64)],
        "pair_dq": [(4, 2, 64), (4, 3, 32), (8, 3, 32), (8, 3, 64)],
        "own_dq": [(4, 2, 64, 64), (4, 3, 128, 32), (8, 2, 128, 64), (4, 3, 64, 32)],
    },
    128: {
        "own_forward": [(8, 2, 64, 64), (8, 2, 128, 64), (4, 3, 64, 32), (8, 3, 128, 32)],
        "pair_forward": [(8, 2, 64), (4, 3, 32), (8, 3, 32)],
        "dkdv": [(8, 2, 32, 64), (8, 2, 32, 32), (8, 2, 16, 128), (8, 2, 16, 64)],
        "pair_dq": [(8, 2, 32), (8, 3, 32), (8, 2, 64)],
        "own_dq": [(8, 2, 64, 32), (8, 2, 64, 64), (8, 2, 128, 32)],
    },
}
_BLOCK_NAMES = {"own_forward": ("BM", "BN"), "pair_forward": ("BN",), "dkdv": ("BM", "BN"),
                "pair_dq": ("BN",), "own_dq": ("BM", "BN")}
KERNEL_FAMILIES = tuple(_BLOCK_NAMES)


def tuned_configs(padded_head_dim: int) -> Optional[Dict[str, List[triton.Config]]]:
    """The autotune set of each kernel family for bf16/fp16 at this padded head size, or None
    (launch the fixed blocks)."""
    table = _TUNED.get(padded_head_dim)
    if table is None:
        return None
    return {
        name: [_cfg(w, s, **dict(zip(_BLOCK_NAMES[name], blocks))) for w, s, *blocks in rows]
        for name, rows in table.items()
    }


def select_blocks(interpreted: bool = INTERPRETED) -> tuple:
    """``(query rows, chunk keys per block, warps)`` of the selection kernel."""
    if interpreted:
        return 64, 16, 1
    # fp32 dots on the FMA units: wider blocks spill at head size 128 (checked for sm_90).
    return 64, 16, 8
