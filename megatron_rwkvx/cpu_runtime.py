"""Run megatron-core 0.16.1 on the CPU with the gloo backend.

megatron-core assumes a CUDA device in a handful of places even when the work itself is device
agnostic (process groups, tensor-parallel linears, pipeline schedules, DDP, the optimizers and
``dist_checkpointing`` all run under gloo). This module redirects exactly those assumptions, and
nothing else, so that tests and CPU runs exercise the real megatron-core code paths:

1. ``torch.cuda.current_device()`` returns ``"cpu"``, so ``device=torch.cuda.current_device()``
   tensor factories and ``.to(torch.cuda.current_device())`` land on the CPU;
2. ``torch.cuda.synchronize()`` and ``torch.cuda.empty_cache()`` are no-ops;
3. tensor factories called with a CUDA device (``device="cuda"``, ``device=0``) are redirected to the
   CPU by a ``TorchFunctionMode`` that only rewrites the ``device`` argument;
4. ``Tensor.cuda()`` returns the tensor unchanged (it is already where the run computes);
5. ``Tensor.type()`` without arguments reports CPU float tensors with their CUDA type names, because
   the optimizers dispatch on ``param.type() == 'torch.cuda.FloatTensor'``;
6. the CUDA RNG state used by megatron's model-parallel RNG tracker is the CPU default generator's
   (``torch.cuda.get_rng_state``/``manual_seed`` and megatron's ``_get/_set_cuda_rng_state``), so
   forking the tracker forks the CPU stream exactly as it forks the GPU stream on a GPU.

The local (non-fused) multi-tensor gradient-clip helpers that megatron-core falls back to without
TE/Apex build their results with ``device="cuda"``; item 3 covers them.

It is switched on only by CPU runs (``--device cpu``), ``load_pretrained(device="cpu")`` and the
tests; GPU runs never import it. ``enable()`` is idempotent and ``disable()`` restores everything.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_enabled = False
_saved: List[Tuple[Any, str, Any]] = []
_mode: "_CudaToCpuFactoryMode | None" = None

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuFactoryMode(TorchFunctionMode):
    """Rewrites a CUDA ``device=`` argument (and ``Tensor.cuda``/``Tensor.to(cuda)``) to the CPU."""

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs)
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        if "pin_memory" in kwargs:
            kwargs = dict(kwargs)
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


def _patch(owner: Any, name: str, value: Any) -> None:
    _saved.append((owner, name, getattr(owner, name, None)))
    setattr(owner, name, value)


class _TrackerWarningFilter(logging.Filter):
    # On the CPU the "GPU" stream is the CPU stream, so the tracker's check that a fork left the CPU
    # stream alone is always tripped by design; the message would only be noise here.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


_filter = _TrackerWarningFilter()


def is_enabled() -> bool:
    return _enabled


def enable() -> None:
    """Redirect megatron-core's CUDA assumptions to the CPU (idempotent)."""
    global _enabled, _mode
    with _lock:
        if _enabled:
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "megatron_rwkvx.cpu_runtime is for machines without a GPU; a CUDA device is "
                "visible here. Run with --device cuda instead (or hide the GPUs with "
                "CUDA_VISIBLE_DEVICES='')."
            )
        from megatron.core.tensor_parallel import random as mp_random

        _patch(torch.cuda, "current_device", lambda: "cpu")
        _patch(torch.cuda, "synchronize", lambda *a, **k: None)
        _patch(torch.cuda, "empty_cache", lambda *a, **k: None)
        _patch(torch.cuda, "device_count", lambda: 0)
        _patch(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
        _patch(torch.cuda, "set_rng_state", lambda state, device="cuda": torch.set_rng_state(state))
        _patch(torch.cuda, "manual_seed", lambda seed: torch.manual_seed(seed))
        _patch(torch.cuda.random, "get_rng_state", lambda device="cuda": torch.get_rng_state())
        _patch(mp_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
        _patch(mp_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))

        original_type = torch.Tensor.type

        def type_with_cuda_names(self, dtype=None, non_blocking=False, **kwargs):
            if dtype is None and not kwargs:
                name = original_type(self)
                return _CUDA_TYPE_NAMES.get(name, name)
            return original_type(self, dtype, non_blocking, **kwargs)

        _patch(torch.Tensor, "type", type_with_cuda_names)

        logging.getLogger(mp_random.__name__).addFilter(_filter)
        _mode = _CudaToCpuFactoryMode()
        _mode.__enter__()
        _enabled = True


def disable() -> None:
    """Undo :func:`enable` (used by tests that check the shim itself)."""
    global _enabled, _mode
    with _lock:
        if not _enabled:
            return
        if _mode is not None:
            _mode.__exit__(None, None, None)
            _mode = None
        while _saved:
            owner, name, value = _saved.pop()
            setattr(owner, name, value)
        from megatron.core.tensor_parallel import random as mp_random

        logging.getLogger(mp_random.__name__).removeFilter(_filter)
        _enabled = False


def summary() -> Dict[str, bool]:
    """What is redirected right now (for logs and tests)."""
    return {"enabled": _enabled, "factory_mode": _mode is not None}
