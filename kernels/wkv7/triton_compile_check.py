"""Ahead-of-time compilation of the WKV-7 kernels for a GPU target, without a GPU
(``kernels/aot_compile.py``).

``compile_all`` compiles the four kernels for every chunk length, both pair-matrix paths and
every autotune configuration the backend may pick, and reports registers and spill bytes: a
configuration that spills on the target is one the GPU run should not have to discover.

    python -m megatron_rwkvx.kernels.wkv7.triton_compile_check bf16 64
"""
from __future__ import annotations

from typing import Dict

from ..aot_compile import compile_kernel
from . import triton_kernels as K

_SCALARS = dict(T="i32", H="i32", N="i32", NT="i32", BH="i32")


def _pointers(fn, dtype: str) -> Dict[str, str]:
    """Inputs/outputs in the input dtype; the backend's intermediate buffers are fp32."""
    io = {"r_ptr", "w_ptr", "k_ptr", "v_ptr", "a_ptr", "b_ptr", "y_ptr", "dy_ptr",
          "dr_ptr", "dw_ptr", "dk_ptr", "dv_ptr", "da_ptr", "db_ptr"}
    return {n: (f"*{dtype}" if n in io else "*fp32") for n in fn.arg_names if n.endswith("_ptr")}


def compile_all(dtype: str = "bf16", head_size: int = 64, capability: int = 90,
                chunks=(16, 32, 64), paths=(True, False)) -> Dict[str, Dict[str, object]]:
    """``{"<kernel> L=<chunk> <path> w=<warps>[ BV=<rows>]": {registers, spill_bytes, ...}}``."""
    from .triton_backend import _CHUNK_CONFIGS, _INTERPRET, _SCAN_CONFIGS, _block_n

    if _INTERPRET:
        raise RuntimeError(
            "the kernels were imported under TRITON_INTERPRET=1 and cannot be compiled; run the "
            "compile check in a process without it"
        )
    prec = "ieee" if dtype == "fp32" else "tf32"
    BN = _block_n(head_size)
    out = {}
    for L in chunks:
        for factored in paths:
            path = "factored" if factored else "exact"
            for cfg in _CHUNK_CONFIGS:
                w = cfg.num_warps
                for backward in (False, True):
                    fn = K._wkv7_prep_kernel
                    consts = dict(L=L, BN=BN, WITH_Y=not backward, STORE_A=backward, PREC=prec,
                                  FACTORED=factored)
                    name = f"prep_{'bwd' if backward else 'fwd'} L={L} {path} w={w}"
                    out[name] = compile_kernel(fn, dict(_SCALARS, **_pointers(fn, dtype)), consts, w,
                                               cfg.num_stages, capability)
                fn = K._wkv7_bwd_chunk_kernel
                consts = dict(L=L, BN=BN, PREC=prec, FACTORED=factored)
                out[f"bwd_chunk L={L} {path} w={w}"] = compile_kernel(
                    fn, dict(_SCALARS, **_pointers(fn, dtype)), consts, w, cfg.num_stages, capability)
        for cfg in _SCAN_CONFIGS:
            BV, w, st = cfg.kwargs["BV"], cfg.num_warps, cfg.num_stages
            if BV > BN:
                continue
            fn = K._wkv7_fwd_scan_kernel
            out[f"fwd_scan L={L} w={w} BV={BV} stages={st}"] = compile_kernel(
                fn, dict(_SCALARS, **_pointers(fn, dtype)),
                dict(L=L, BN=BN, BV=BV, HAS_INIT=True, PREC=prec), w, st, capability)
            fn = K._wkv7_bwd_scans_kernel
            out[f"bwd_scans L={L} w={w} BV={BV} stages={st}"] = compile_kernel(
                fn, dict(_SCALARS, **_pointers(fn, dtype)),
                dict(L=L, BN=BN, BV=BV, HAS_INIT=True, HAS_DFINAL=True, PREC=prec), w, st, capability)
    return out


if __name__ == "__main__":
    import sys

    dt = sys.argv[1] if len(sys.argv) > 1 else "bf16"
    hs = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    print(f"{'kernel':44s} {'regs':>5s} {'spill B':>8s} wgmma")
    for key, info in compile_all(dt, hs).items():
        print(f"{key:44s} {info['registers']:5d} {info['spill_bytes']:8d} {info['uses_wgmma']}")
