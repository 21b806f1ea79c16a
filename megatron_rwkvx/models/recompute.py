"""Activation recomputation of the RWKV-X stack, with Megatron-LM's flags and meanings.

``--recompute-granularity full`` keeps only the input of a recomputed unit and reruns its forward
in the backward, through megatron-core's ``tensor_parallel.checkpoint`` (which restores the CPU,
CUDA and model-parallel tracker RNG states, so recomputed dropout or init-time noise matches):

* ``--recompute-method uniform --recompute-num-layers N``: this stage's (model chunk's) layers in
  consecutive groups of N, each group one unit that keeps only the group's input;
* ``--recompute-method block --recompute-num-layers N``: the first N layers of the stage (chunk)
  each recomputed; the rest keep everything.

``--recompute-granularity selective`` recomputes, in every layer, what takes memory but little
compute: the outputs of the block's width-C column projections (receptance/key/value of the
TimeMix, query/key/value of the sparse attention, the ChannelMix key) are kept; token-shift mixes,
the LoRAs, decay/gate/normalisations, the WKV-7 and sparse-attention operators' saved tensors, the
ChannelMix hidden and the layer norms are recomputed. It is torch's selective checkpointing with a
policy that saves exactly the outputs of those projections' matmuls. The row-parallel output
projections are not kept: under tensor parallelism their output is all-reduced in place, which a
cached result cannot follow.

Collectives inside a unit (tensor, sequence and context parallel) rerun in the backward; every rank
recomputes its layers in the same order, so they pair up as in the forward.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence, Set, Tuple

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from megatron_rwkvx.errors import UsageError

GRANULARITIES = ("full", "selective")
METHODS = ("uniform", "block")
# The trainer's flags of each recompute mode the tools compare: none, whole blocks (one block per
# unit, the measured figures' unit) and selective.
MODE_FLAGS = {
    "none": [],
    "full": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    "selective": ["--recompute-granularity", "selective"],
}

# The ops through which a kept projection computes its output (bias-free linears).
_MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
}


class RecomputeError(UsageError):
    """An impossible combination of the recompute flags."""


def check_recompute(granularity: Optional[str], method: Optional[str], num_layers: Optional[int],
                    layers_per_chunk: Optional[int] = None) -> None:
    """The flag rules of Megatron-LM, each refused with the fix; ``layers_per_chunk`` (the layers
    of one pipeline stage or virtual chunk) bounds ``--recompute-num-layers`` when known."""
    if granularity is None:
        if method is not None or num_layers is not None:
            raise RecomputeError("--recompute-method / --recompute-num-layers need "
                                 "--recompute-granularity full")
        return
    if granularity not in GRANULARITIES:
        raise RecomputeError(f"--recompute-granularity {granularity!r}: choose full or selective")
    if granularity == "selective":
        if method is not None or num_layers is not None:
            raise RecomputeError("--recompute-granularity selective recomputes inside every layer; "
                                 "drop --recompute-method / --recompute-num-layers (they go with full)")
        return
    if method not in METHODS:
        raise RecomputeError("--recompute-granularity full needs --recompute-method uniform or block")
    if num_layers is None or num_layers < 1:
        raise RecomputeError("--recompute-granularity full needs --recompute-num-layers N >= 1 "
                             "(uniform: layers per recomputed group; block: layers recomputed per stage)")
    if layers_per_chunk is not None and num_layers > layers_per_chunk:
        raise RecomputeError(f"--recompute-num-layers {num_layers} exceeds the {layers_per_chunk} "
                             "layers of a pipeline stage (virtual chunk); give at most that")


def _run(layers: Sequence[torch.nn.Module], hidden: torch.Tensor, v_first):
    for layer in layers:
        hidden, v_first = layer(hidden, v_first)
    return hidden, v_first


def _kept_projection_weights(layer: torch.nn.Module, width: int) -> Set[int]:
    """Storage addresses of the weights whose matmul outputs selective recomputation keeps."""
    return {
        m.weight.data_ptr()
        for m in layer.modules()
        if isinstance(m, ColumnParallelLinear) and m.input_size == width
    }


def _selective_policy(kept: Set[int], ctx, op, *args, **kwargs):
    if op in _MATMULS and any(isinstance(a, torch.Tensor) and a.data_ptr() in kept for a in args):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective(layer: torch.nn.Module, width: int, hidden: torch.Tensor, v_first):
    policy = partial(_selective_policy, _kept_projection_weights(layer, width))
    return checkpoint(
        lambda h, v: layer(h, v), hidden, v_first, use_reentrant=False,
        context_fn=partial(create_selective_checkpoint_contexts, policy),
    )


def _full(layers: Sequence[torch.nn.Module], config, hidden: torch.Tensor, v_first):
    if not hidden.requires_grad:
        # A reentrant checkpoint's outputs need a differentiable input: with a frozen embedding
        # (stage 1) the trainable blocks inside the unit would otherwise get no gradient.
        hidden = hidden.detach().requires_grad_()
    return tensor_parallel.checkpoint(
        partial(_run, layers), config.distribute_saved_activations, hidden, v_first
    )


def recompute_units(num_layers: int, method: str, n: int) -> Tuple[Tuple[int, int, bool], ...]:
    """(start, end, recomputed) spans of a chunk's layers under full recomputation."""
    if method == "uniform":
        return tuple((s, min(s + n, num_layers), True) for s in range(0, num_layers, n))
    spans = tuple((i, i + 1, True) for i in range(min(n, num_layers)))
    return spans + (((n, num_layers, False),) if n < num_layers else ())


def run_layers(layers: Sequence[torch.nn.Module], hidden: torch.Tensor, v_first, config):
    """The stack's layers on (hidden, v_first), recomputed as ``config`` asks (megatron-core's
    ``recompute_granularity`` / ``recompute_method`` / ``recompute_num_layers``)."""
    granularity = config.recompute_granularity if torch.is_grad_enabled() else None
    if granularity is None:
        return _run(layers, hidden, v_first)
    if granularity == "selective":
        for layer in layers:
            hidden, v_first = _selective(layer, config.hidden_size, hidden, v_first)
        return hidden, v_first
    for start, end, recomputed in recompute_units(
        len(layers), config.recompute_method, config.recompute_num_layers
    ):
        chunk = layers[start:end]
        if recomputed:
            hidden, v_first = _full(chunk, config, hidden, v_first)
        else:
            hidden, v_first = _run(chunk, hidden, v_first)
    return hidden, v_first

