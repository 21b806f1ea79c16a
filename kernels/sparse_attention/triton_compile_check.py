"""Ahead-of-time compilation of the sparse-attention kernels for a GPU target, without a GPU.

The interpreter runs the kernels' arithmetic but not the compiler: it accepts non-constexpr
globals, mismatched loop-carried types and dot shapes that fail to compile, and it says nothing
about register pressure. ``compile_all`` lowers every kernel through Triton's NVIDIA backend to
a cubin (ptxas ships with triton) with the block sizes the backend would launch, marks pointer and
stride arguments divisible by 16 as the JIT does for contiguous tensors of head size 64/128, and
reads registers and spill bytes from the cubin with the bundled ``cuobjdump``.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from typing import Dict, Optional

_STRIDES = ("stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh")
_SCALARS = dict(
    Tq="i32", Hq="i32", Hkv="i32", q_offset="i32", chunk="i32", key_stop="i32", n_past="i32",
    qk_scale="fp32", scale="fp32",
)


def _resource_usage(cubin: bytes) -> Optional[Dict[str, int]]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    for line in text.splitlines():
        if "REG:" in line:
            fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
            return {"registers": int(fields["REG"]), "spill_bytes": int(fields["STACK"])}
    return None


def _compile(fn, args: Dict[str, str], consts: Dict[str, object], warps: int, stages: int, capability: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {n: ("constexpr" if n in consts else args[n]) for n in names}
    aligned = [n for n in names if n not in consts and (args[n].startswith("*") or n.startswith("stride"))]
    src = ASTSource(
        fn,
        signature,
        constexprs={(names.index(n),): v for n, v in consts.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    kernel = triton.compile(
        src, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps, "num_stages": stages}
    )
    info = {"warps": warps, "uses_wgmma": "wgmma" in kernel.asm.get("ptx", "")}
    usage = _resource_usage(kernel.asm["cubin"])
    info.update(usage or {"registers": -1, "spill_bytes": -1})
    return info


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
