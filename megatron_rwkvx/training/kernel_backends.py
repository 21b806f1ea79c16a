"""Which backend each operator of the model runs, resolved and logged once at start-up.

With ``auto`` this is where the choice is made (``kernels/registry.py``: the probe on a GPU runs
at the ranks' head layout and sequence length, and the layers reuse the cached choice). In a job
of several ranks one rank probes and the others adopt its decision (``_decided_on_rank_zero``),
so that every rank runs the same backend. A forced backend that cannot run here
(``--wkv-backend triton`` without working Triton) ends the run now with one ``error:`` line
naming why, instead of at the first forward pass.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, List

import torch

from megatron_rwkvx.config import ATTENTION_SYMBOL, DENSE_MODE, RWKV_SYMBOL, RWKVXConfig
from megatron_rwkvx.errors import UsageError
from megatron_rwkvx.kernels.registry import AUTO, BackendUnavailableError, Choice, Operator
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


def _decided_on_rank_zero(op: Operator, flag: str, x: torch.Tensor, call) -> Choice:
    """``auto``'s choice, probed on global rank 0 and broadcast: the same backend on every rank.

    Probing on each rank would let timing noise pick different backends on ranks that share
    one tensor-parallel or context-parallel computation (different numerics inside one layer).
    One global decision, rather than one per node, also keeps data-parallel replicas and reruns
    on the same numerics; the cost is that a job mixing device kinds runs the backend chosen for
    rank 0's device, and when a rank cannot run it the job stops on every rank with an error asking
    to name a backend (``Operator.adopt``)."""
    dist = torch.distributed
    box: List[object] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = _report(op, flag, AUTO, x, call)
        except Exception as err:  # the other ranks wait in the broadcast: send them the failure
            box[0] = err
    dist.broadcast_object_list(box, src=0)
    decided = box[0]
    if isinstance(decided, UsageError):
        raise decided
    if isinstance(decided, Exception):
        raise RuntimeError(f"{flag} auto: rank 0 failed to choose the {op.name} backend: "
                           f"{type(decided).__name__}: {decided}") from decided
    decided = replace(decided, reason=f"{decided.reason}; decided on rank 0 for all {dist.get_world_size()} ranks")
    adopted, refusal = None, None
    try:
        adopted = op.adopt(decided, x)
    except UsageError as err:
        refusal = str(err)
    # Every rank learns of any refusal, so that none goes on to the next collective alone.
    refusals: List[object] = [None] * dist.get_world_size()
    dist.all_gather_object(refusals, refusal)
    failed = "; ".join(f"rank {r}: {why}" for r, why in enumerate(refusals) if why is not None)
    if failed:
        raise BackendUnavailableError(f"{flag} auto: {failed}")
    return adopted


def _choose(op: Operator, flag: str, name: str, x: torch.Tensor, call=None) -> Choice:
    dist = torch.distributed
    if name == AUTO and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _decided_on_rank_zero(op, flag, x, call)
    return _report(op, flag, name, x, call)


def kernel_backends(cfg: RWKVXConfig, seq_length: int, device: torch.device) -> List[Choice]:
    """Per operator the model uses: the backend it runs on this rank, and why. Every rank of a
    ``torch.distributed`` job calls this (``auto`` broadcasts rank 0's decision)."""
    tp, cp = cfg.tensor_model_parallel_size, cfg.context_parallel_size
    T, n = max(1, seq_length // cp), cfg.head_size
    heads = cfg.num_attention_heads // tp
    choices = []
    if RWKV_SYMBOL in cfg.layer_pattern:
        x = _like(T, heads, n, device, cfg.params_dtype)
        choices.append(_choose(WKV7, "--wkv-backend", cfg.wkv_backend, x))
    if ATTENTION_SYMBOL in cfg.layer_pattern and cfg.attention_mode == DENSE_MODE:
        # The top-k operator is not used: say what runs instead (--sparse-attention-backend is moot).
        path = "flash" if uses_flash(device, cfg.params_dtype) else "any"
        choices.append(Choice("dense-attention", DENSE_MODE, "sdpa",
                              f"--attention-mode dense: causal SDPA ({path} kernel) in every A block",
                              str(device), str(cfg.params_dtype).replace("torch.", "")))
    elif ATTENTION_SYMBOL in cfg.layer_pattern:
        call = dict(chunk_size=cfg.sparse_chunk_size, top_k=cfg.sparse_top_k, scale=n ** -0.5,
                    kv_heads=(cfg.num_query_groups or cfg.num_attention_heads) // tp,
                    selection=cfg.sparse_selection)
        q = _like(T, heads, n, device, cfg.params_dtype)
        choices.append(_choose(SPARSE_ATTENTION, "--sparse-attention-backend", cfg.sparse_attention_backend, q, call))
    return choices


def log_kernel_backends(cfg: RWKVXConfig, seq_length: int, device: torch.device,
                        log: Callable[[str], None]) -> List[Choice]:
    """Resolve (``kernel_backends``), log one line per operator and return the choices."""
    choices = kernel_backends(cfg, seq_length, device)
    for choice in choices:
        log(choice.line())
    return choices
