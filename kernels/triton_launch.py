"""How the Triton kernels are launched: interpreter detection and autotuned-or-fixed launches.

On a GPU each kernel family is wrapped in ``triton.autotune`` over a small set of block sizes
(each set compiled for sm_90 without register spills, see the ``triton_compile_check`` modules),
because the best tiles depend on the card and the shapes and cannot be chosen without one. The
first call per autotune key benchmarks the set (seconds; compiled kernels are cached on disk).

A fixed configuration is launched instead:
- under Triton's interpreter (``TRITON_INTERPRET=1``; tests on the CPU), where tuning would only
  multiply the run time;
- when ``RWKVX_TRITON_AUTOTUNE=0``: runs that must repeat bit for bit, since the tuner may pick
  different tiles in another process, and tiles change the order of floating-point sums.
"""
from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is set now."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ``triton.jit`` reads TRITON_INTERPRET when it decorates a kernel, so what counts is its value
# when the kernel modules were imported, not at launch.
INTERPRETED = interpreting()

AUTOTUNE_ENV = "RWKVX_TRITON_AUTOTUNE"


def autotune_enabled() -> bool:
    """Whether launches may autotune (read at each launch, so a test or a script can switch)."""
    if INTERPRETED:
        return False
    value = os.environ.get(AUTOTUNE_ENV, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{AUTOTUNE_ENV} must be 0 or 1, got {os.environ[AUTOTUNE_ENV]!r}")


def autotuned(kernel, configs, key, prune=None):
    """``triton.autotune`` of ``kernel`` over ``configs`` keyed on the argument names ``key``
    (the tensor arguments' dtypes are part of every key)."""
    extra = {"prune_configs_by": {"early_config_prune": prune}} if prune else {}
    return triton.autotune(configs=configs, key=key, **extra)(kernel)


def launch(tuned, raw, grid, args, fixed: triton.Config, **meta):
    """Launch ``tuned`` (autotuned) when autotuning is on, else (or when ``tuned`` is None) ``raw``
    with ``fixed``'s block sizes, warps and stages. ``grid``: a tuple or a function of the
    meta-parameters."""
    if tuned is not None and autotune_enabled():
        tuned[grid](*args, **meta)
        return
    meta = {**meta, **fixed.kwargs}
    g = grid(meta) if callable(grid) else grid
    raw[g](*args, **meta, num_warps=fixed.num_warps, num_stages=fixed.num_stages)
