"""Ahead-of-time compilation of the sparse-attention kernels for a GPU target, without a GPU
(``kernels/aot_compile.py``): ``compile_all`` compiles every kernel with the fixed block sizes,
``compile_tuned`` every configuration of the GPU autotune sets (head size 64/128), and both report
registers and spill bytes (``python -m ...triton_compile_check bf16 64 [tuned]``). This caught what
the interpreter cannot (a non-constexpr global) and set the block sizes.
"""
from __future__ import annotations

from ..aot_compile import compile_kernel as _compile

_STRIDES = ("stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh")
_SCALARS = dict(
    Tq="i32", Hq="i32", Hkv="i32", q_offset="i32", chunk="i32", key_stop="i32", n_past="i32",
    qk_scale="fp32", scale="fp32", n_bh="i32", T_BUCKET="i32",
)


def _signatures(dtype: str):
    ptr, f32, i32 = f"*{dtype}", "*fp32", "*i32"
    base = dict(_SCALARS, **{s: "i32" for s in _STRIDES})
    pairs = dict(PAIRS=i32, TILE_GROUP=i32, TILE_START=i32, OFFSETS=i32)
    return {
        "own_forward": dict(base, Q=ptr, K=ptr, V=ptr, O=ptr, LSE=f32, OP=f32, LSEP=f32, SEL=i32),
        "pair_forward": dict(base, Q=ptr, K=ptr, V=ptr, OP=f32, LSEP=f32, **pairs),
        "dkdv": dict(base, Q=ptr, K=ptr, V=ptr, DO=ptr, LSE=f32, DELTA=f32, DK=ptr, DV=ptr, PAIRS=i32, OFFSETS=i32),
        "pair_dq": dict(base, Q=ptr, K=ptr, V=ptr, DO=ptr, LSE=f32, DELTA=f32, DQP=f32, **pairs),
        "own_dq": dict(base, Q=ptr, K=ptr, V=ptr, DO=ptr, LSE=f32, DELTA=f32, DQ=ptr, DQP=f32, SEL=i32),
    }


def _check_not_interpreted():
    from .triton_config import INTERPRETED

    if INTERPRETED:
        raise RuntimeError(
            "the kernels were imported under TRITON_INTERPRET=1 and cannot be compiled; run the "
            "compile check in a process without it"
        )


def _compile_family(name, config, dtype, head_dim, capability, group, slots, pair_tile):
    from .triton_backend import _RAW
    from .triton_config import next_pow2

    consts = dict(D=head_dim, BD=max(16, next_pow2(head_dim)), S=slots, PREC="ieee" if dtype == "fp32" else "tf32")
    consts.update(config.kwargs)
    if name.startswith("pair"):
        consts["BM"] = pair_tile
    else:
        consts["G"] = group
    return _compile(_RAW[name], _signatures(dtype)[name], consts, config.num_warps, config.num_stages, capability)


def compile_all(dtype: str = "bf16", head_dim: int = 64, capability: int = 90, group: int = 2, slots: int = 2):
    """Compile every kernel with the fixed blocks (``blocks_for``: interpreter off, autotuning
    off, fp32) for ``sm_<capability>``; returns ``{kernel: {registers, spill_bytes, ...}}``.

    ``spill_bytes`` is -1 when cuobjdump is unavailable."""
    from . import triton_attention as ta
    from . import triton_select as ts
    from .selection import QUEST_SELECTION, selection_key_width
    from .triton_config import blocks_for, fixed_configs, next_pow2, select_blocks

    _check_not_interpreted()
    b = blocks_for(head_dim, 4 if dtype == "fp32" else 2, interpreted=False)
    out = {
        name: _compile_family(name, cfg, dtype, head_dim, capability, group, slots, b.m)
        for name, cfg in fixed_configs(b).items()
    }
    ptr = f"*{dtype}"
    d = dict(D=head_dim, BD=max(16, next_pow2(head_dim)))
    out["delta"] = _compile(
        ta._delta_kernel,
        dict(O=ptr, DO=ptr, DELTA="*fp32", stride_qb="i32", stride_qt="i32", stride_qh="i32", Tq="i32", Hq="i32"),
        dict(d, BM=64), 4, 1, capability,
    )
    sel_m, sel_n, sel_warps = select_blocks(interpreted=False)
    out["chunk_mean"] = _compile(
        ts._chunk_mean_kernel,
        dict(K=ptr, OUT="*fp32", stride_kb="i32", stride_kt="i32", stride_kh="i32", stride_ob="i32",
             stride_on="i32", stride_oh="i32", Hkv="i32", chunk="i32"),
        dict(d, BT=64), 4, 1, capability,
    )
    select_args = dict(CK="*fp32", SEL="*i32", stride_qb="i32", stride_qt="i32", stride_qh="i32", stride_cb="i32",
                       stride_cn="i32", stride_ch="i32", Tq="i32", Hq="i32", q_offset="i32", chunk="i32")
    select_consts = dict(G=group, S=slots, SP=max(2, next_pow2(slots)), BM=sel_m, NCB=sel_n)
    out["select"] = _compile(ts._select_kernel, dict(select_args, Q=ptr), dict(d, **select_consts),
                             sel_warps, 1, capability)
    # selection="quest" scores fp32 queries of another width (selection.selection_queries).
    quest_width = selection_key_width(head_dim, QUEST_SELECTION)
    quest_d = dict(D=quest_width, BD=max(16, next_pow2(quest_width)))
    out["select_quest"] = _compile(ts._select_kernel, dict(select_args, Q="*fp32"), dict(quest_d, **select_consts),
                                   sel_warps, 1, capability)
    return out


def compile_tuned(dtype: str = "bf16", head_dim: int = 64, capability: int = 90, group: int = 2,
                  slots: int = 2, pair_tiles=(64, 128)):
    """Compile every configuration of the autotune sets (``tuned_configs``), the pair kernels at
    each pair tile; returns a list of ``{kernel, config, pair_tile, registers, spill_bytes, ...}``."""
    from .triton_config import next_pow2, tuned_configs

    _check_not_interpreted()
    sets = tuned_configs(max(16, next_pow2(head_dim)))
    if sets is None:
        return []
    rows = []
    for name, configs in sets.items():
        for cfg in configs:
            for tile in pair_tiles if name.startswith("pair") else (None,):
                info = _compile_family(name, cfg, dtype, head_dim, capability, group, slots, tile)
                rows.append(dict(kernel=name, config=str(cfg), pair_tile=tile, **info))
    return rows


if __name__ == "__main__":
    import json
    import sys

    dt = sys.argv[1] if len(sys.argv) > 1 else "bf16"
    hd = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    if len(sys.argv) > 3 and sys.argv[3] == "tuned":
        for row in compile_tuned(dt, hd):
            print(json.dumps(row))
    else:
        print(json.dumps(compile_all(dt, hd), indent=1))
