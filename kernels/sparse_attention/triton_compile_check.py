"""Ahead-of-time compilation of the sparse-attention kernels for a GPU target, without a GPU
(``kernels/aot_compile.py``): ``compile_all`` compiles every kernel with the block sizes the
backend would launch (head size 64/128) and reports registers and spill bytes. This caught what
the interpreter cannot (a non-constexpr global) and set the block sizes.
"""
from __future__ import annotations

from ..aot_compile import compile_kernel as _compile

_STRIDES = ("stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh")
_SCALARS = dict(
    Tq="i32", Hq="i32", Hkv="i32", q_offset="i32", chunk="i32", key_stop="i32", n_past="i32",
    qk_scale="fp32", scale="fp32",
)


def compile_all(dtype: str = "bf16", head_dim: int = 64, capability: int = 90, group: int = 2, slots: int = 2):
    """Compile every kernel for ``sm_<capability>``; returns ``{kernel: {registers, spill_bytes, ...}}``.

    ``spill_bytes`` is -1 when cuobjdump is unavailable."""
    from . import triton_attention as ta
    from . import triton_select as ts
    from .triton_config import INTERPRETED, Blocks, blocks_for, next_pow2, select_blocks

    if INTERPRETED:
        raise RuntimeError(
            "the kernels were imported under TRITON_INTERPRET=1 and cannot be compiled; run the "
            "compile check in a process without it"
        )
    b: Blocks = blocks_for(head_dim, 4 if dtype == "fp32" else 2, interpreted=False)
    sel_m, sel_n, sel_warps = select_blocks(interpreted=False)
    ptr = f"*{dtype}"
    prec = "ieee" if dtype == "fp32" else "tf32"
    d = dict(D=head_dim, BD=max(16, next_pow2(head_dim)))
    base = dict(_SCALARS, **{s: "i32" for s in _STRIDES})
    f32, i32 = "*fp32", "*i32"
    pairs = dict(PAIRS=i32, TILE_GROUP=i32, TILE_START=i32, OFFSETS=i32)
    out = {}
    out["own_forward"] = _compile(
        ta._own_forward_kernel,
        dict(base, Q=ptr, K=ptr, V=ptr, O=ptr, LSE=f32, OP=f32, LSEP=f32, SEL=i32),
        dict(d, G=group, S=slots, BM=b.m, BN=b.n, PREC=prec), b.warps, b.stages, capability,
    )
    out["pair_forward"] = _compile(
        ta._pair_forward_kernel,
        dict(base, Q=ptr, K=ptr, V=ptr, OP=f32, LSEP=f32, **pairs),
        dict(d, S=slots, BM=b.m, BN=b.n, PREC=prec), b.warps, b.stages, capability,
    )
    out["delta"] = _compile(
        ta._delta_kernel, dict(base, O=ptr, DO=ptr, DELTA=f32), dict(d, BM=b.m), 4, 1, capability
    )
    out["dkdv"] = _compile(
        ta._dkdv_kernel,
        dict(base, Q=ptr, K=ptr, V=ptr, DO=ptr, LSE=f32, DELTA=f32, DK=ptr, DV=ptr, PAIRS=i32, OFFSETS=i32),
        dict(d, G=group, S=slots, BM=b.kv_m, BN=b.kv_n, PREC=prec), b.kv_warps, b.bwd_stages, capability,
    )
    out["pair_dq"] = _compile(
        ta._pair_dq_kernel,
        dict(base, Q=ptr, K=ptr, V=ptr, DO=ptr, LSE=f32, DELTA=f32, DQP=f32, **pairs),
        dict(d, S=slots, BM=b.m, BN=b.dq_n, PREC=prec), b.dq_warps, b.bwd_stages, capability,
    )
    out["own_dq"] = _compile(
        ta._own_dq_kernel,
        dict(base, Q=ptr, K=ptr, V=ptr, DO=ptr, LSE=f32, DELTA=f32, DQ=ptr, DQP=f32, SEL=i32),
        dict(d, G=group, S=slots, BM=b.m, BN=b.dq_n, PREC=prec), b.dq_warps, b.bwd_stages, capability,
    )
    out["chunk_mean"] = _compile(
        ts._chunk_mean_kernel,
        dict(K=ptr, OUT=f32, stride_kb="i32", stride_kt="i32", stride_kh="i32", stride_ob="i32",
             stride_on="i32", stride_oh="i32", Hkv="i32", chunk="i32"),
        dict(d, BT=64), 4, 1, capability,
    )
    out["select"] = _compile(
        ts._select_kernel,
        dict(Q=ptr, CK=f32, SEL=i32, stride_qb="i32", stride_qt="i32", stride_qh="i32", stride_cb="i32",
             stride_cn="i32", stride_ch="i32", Tq="i32", Hq="i32", q_offset="i32", chunk="i32"),
        dict(d, G=group, S=slots, SP=max(2, next_pow2(slots)), BM=sel_m, NCB=sel_n), sel_warps, 1, capability,
    )
    return out


if __name__ == "__main__":
    import json
    import sys

    dt = sys.argv[1] if len(sys.argv) > 1 else "bf16"
    hd = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    print(json.dumps(compile_all(dt, hd), indent=1))
