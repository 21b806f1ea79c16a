"""Which backend each operator of the model runs, resolved and logged once at start-up.

With ``auto`` this is where the choice is made (``kernels/registry.py``: the probe on a GPU runs
at this rank's head layout and sequence length, and the layers reuse the cached choice); a
forced backend that cannot run here (``--wkv-backend triton`` without working Triton) ends the
run now with one ``error:`` line naming why, instead of at the first forward pass.
"""
from __future__ import annotations

from typing import Callable, List

import torch

from megatron_rwkvx.config import ATTENTION_SYMBOL, DENSE_MODE, RWKV_SYMBOL, RWKVXConfig
from megatron_rwkvx.errors import UsageError
from megatron_rwkvx.kernels.registry import Choice, Operator
from megatron_rwkvx.kernels.sparse_attention import SPARSE_ATTENTION
from megatron_rwkvx.kernels.sparse_attention.dense import uses_flash
from megatron_rwkvx.kernels.wkv7 import WKV7


def _like(T: int, heads: int, head_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A [1, T, heads, head_size] tensor of the run's device and dtype, without T's memory."""
    return torch.empty(1, 1, heads, head_size, device=device, dtype=dtype).expand(1, T, heads, head_size)


def _report(op: Operator, flag: str, name: str, x: torch.Tensor, call=None) -> Choice:
    try:
        return op.report(name, x, call)
    except UsageError as err:  # name the flag that asked for it
        raise type(err)(f"{flag} {name}: {err}") from err


def kernel_backends(cfg: RWKVXConfig, seq_length: int, device: torch.device) -> List[Choice]:
    """Per operator the model uses: the backend it runs on this rank, and why."""
    tp, cp = cfg.tensor_model_parallel_size, cfg.context_parallel_size
    T, n = max(1, seq_length // cp), cfg.head_size
    heads = cfg.num_attention_heads // tp
    choices = []
    if RWKV_SYMBOL in cfg.layer_pattern:
        x = _like(T, heads, n, device, cfg.params_dtype)
        choices.append(_report(WKV7, "--wkv-backend", cfg.wkv_backend, x))
    if ATTENTION_SYMBOL in cfg.layer_pattern and cfg.attention_mode == DENSE_MODE:
        # The top-k operator is not used: say what runs instead (--sparse-attention-backend is moot).
        path = "flash" if uses_flash(device, cfg.params_dtype) else "any"
        choices.append(Choice("dense-attention", DENSE_MODE, "sdpa",
                              f"--attention-mode dense: causal SDPA ({path} kernel) in every A block",
                              str(device), str(cfg.params_dtype).replace("torch.", "")))
    elif ATTENTION_SYMBOL in cfg.layer_pattern:
        call = dict(chunk_size=cfg.sparse_chunk_size, top_k=cfg.sparse_top_k, scale=n ** -0.5,
                    kv_heads=(cfg.num_query_groups or cfg.num_attention_heads) // tp)
        q = _like(T, heads, n, device, cfg.params_dtype)
        choices.append(_report(SPARSE_ATTENTION, "--sparse-attention-backend", cfg.sparse_attention_backend, q, call))
    return choices


def log_kernel_backends(cfg: RWKVXConfig, seq_length: int, device: torch.device,
                        log: Callable[[str], None]) -> List[Choice]:
    """Resolve (``kernel_backends``), log one line per operator and return the choices."""
    choices = kernel_backends(cfg, seq_length, device)
    for choice in choices:
        log(choice.line())
    return choices
