"""Ahead-of-time compilation of a Triton kernel for an NVIDIA target, without a GPU.

The interpreter runs a kernel's arithmetic but not the compiler: it accepts code that fails to
compile and says nothing about register pressure. ``compile_kernel`` lowers a kernel through
Triton's NVIDIA backend to a cubin (ptxas ships with triton), marking pointer and stride arguments
divisible by 16 as the JIT does for contiguous tensors, and reads registers and spill bytes from
the cubin with the bundled ``cuobjdump``. Used by each operator's ``triton_compile_check``.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from typing import Dict, Optional


def resource_usage(cubin: bytes) -> Optional[Dict[str, int]]:
    """``{registers, spill_bytes}`` of a cubin, or None without cuobjdump."""
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


def compile_kernel(fn, args: Dict[str, str], consts: Dict[str, object], warps: int, stages: int,
                   capability: int) -> Dict[str, object]:
    """Compile ``fn`` (a ``triton.jit`` function) with argument types ``args`` (e.g. ``"*bf16"``,
    ``"i32"``) and constexprs ``consts``; ``{warps, uses_wgmma, registers, spill_bytes}``
    (-1 for the last two when cuobjdump is unavailable)."""
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
    usage = resource_usage(kernel.asm["cubin"])
    info.update(usage or {"registers": -1, "spill_bytes": -1})
    return info
