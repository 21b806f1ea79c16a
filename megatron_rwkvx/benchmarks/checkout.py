"""What the benchmark commands in ``tools/`` need to run from an uninstalled checkout (the GPU
machine has none installed): ``kernels/`` importable as ``megatron_rwkvx.kernels``, as the
installed package maps it (setup.py)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def make_kernels_importable(repo: Path) -> None:
    """Map ``repo/kernels`` to ``megatron_rwkvx.kernels`` unless the package already provides it."""
    import megatron_rwkvx

    if importlib.util.find_spec("megatron_rwkvx.kernels") is not None:
        return
    spec = importlib.util.spec_from_file_location(
        "megatron_rwkvx.kernels", repo / "kernels" / "__init__.py",
        submodule_search_locations=[str(repo / "kernels")],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["megatron_rwkvx.kernels"] = module
    spec.loader.exec_module(module)
    megatron_rwkvx.kernels = module
