"""Block sizes of the sparse-attention Triton kernels, and interpreter detection.

The interpreter (``TRITON_INTERPRET=1``, CPU tensors) runs every program in numpy at a cost per
op, not per element, so it gets few large blocks; on a GPU the blocks follow head size and dtype. The GPU sizes
are untuned starting points, chosen so that each kernel compiles for sm_90 without register
spills (checked offline with ``triton.compile`` for a GPUTarget, no GPU needed), not measured
optima.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is set now."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ``triton.jit`` reads TRITON_INTERPRET when it decorates a kernel, so what counts is its value
# when the kernel modules were imported, not at launch.
INTERPRETED = interpreting()


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


def select_blocks(interpreted: bool = INTERPRETED) -> tuple:
    """``(query rows, chunk keys per block, warps)`` of the selection kernel."""
    if interpreted:
        return 64, 16, 1
    # fp32 dots on the FMA units: wider blocks spill at head size 128 (checked for sm_90).
    return 64, 16, 8
