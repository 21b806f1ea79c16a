"""Gradient bookkeeping shared by the RWKV-X mixers under tensor (and sequence) parallelism.

The mixers gather their input once, then feed every head-split projection from it. Two facts
follow, and both are handled here so the mixers stay readable:

* the gradient reaching the gathered input is a partial sum over the ranks' heads, so the gather's
  backward must sum it over the tensor-parallel group (an all-reduce without sequence parallelism,
  a reduce-scatter with it); the column-parallel projections themselves then must not reduce again
  (they are built with ``disable_grad_reduce=True`` and no sequence-parallel gather);
* replicated parameters that act on the full input (token-shift mixes, the first LoRA matrices)
  feed head-split outputs, so each rank's gradient for them is partial too; ``replicated_param``
  passes the parameter through an identity whose backward all-reduces its (small) gradient.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Union

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_rwkvx.parallel.cp_comm import previous_token_from_prev_rank


def tp_world_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def gather_mixer_input(hidden_states: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Full-sequence input of a mixer whose gradient is summed over the tensor-parallel group."""
    if tp_world_size() == 1:
        return hidden_states
    if sequence_parallel:
        return gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True)
    return copy_to_tensor_model_parallel_region(hidden_states)


def replicated_param(param: torch.Tensor) -> torch.Tensor:
    """Identity on a replicated parameter; its gradient is all-reduced over tensor parallelism."""
    if tp_world_size() == 1:
        return param
    return copy_to_tensor_model_parallel_region(param)


def projection_config(config):
    """Config for column-parallel projections fed by an already gathered input."""
    if not config.sequence_parallel:
        return config
    projection = dataclasses.replace(config, sequence_parallel=False)
    return projection


def shard_dim0(full: torch.Tensor) -> torch.Tensor:
    """This rank's slice along dim 0 of a tensor split evenly over tensor parallelism."""
    world, rank = tp_world_size(), tp_rank()
    size = full.shape[0] // world
    return full[rank * size : (rank + 1) * size]


_WHOLE_SEQUENCES = [False]


def context_parallel_group():
    """The context-parallel group, or None when the sequence is not split."""
    if parallel_state.get_context_parallel_world_size() == 1 or _WHOLE_SEQUENCES[0]:
        return None
    return parallel_state.get_context_parallel_group()


@contextlib.contextmanager
def whole_sequences_per_rank():
    """The mixers see whole sequences on every rank (LongCE's short windows, spread over the CP
    ranks as independent sequences): no context-parallel exchange while this is active."""
    before, _WHOLE_SEQUENCES[0] = _WHOLE_SEQUENCES[0], True
    try:
        yield
    finally:
        _WHOLE_SEQUENCES[0] = before


def previous_token_across_ranks(x: torch.Tensor, previous: "torch.Tensor | None"):
    """Token before ``x[0]``: given (inference state), from the previous context-parallel rank,
    or None (zeros) at the sequence start."""
    if previous is not None:
        return previous
    group = context_parallel_group()
    if group is None:
        return None
    return previous_token_from_prev_rank(x, group)


@dataclass
class ProjectionSubmodules:
    """The linear layers a mixer is built from (local or Transformer-Engine classes)."""

    column_linear: Union[ModuleSpec, type] = None
    row_linear: Union[ModuleSpec, type] = None


def build_column_projection(submodules: ProjectionSubmodules, config, in_size: int, out_size: int,
                            init_method):
    """A head-split projection fed by the mixer's gathered input (no gather, no grad reduce)."""
    return build_module(
        submodules.column_linear,
        in_size,
        out_size,
        config=projection_config(config),
        init_method=init_method,
        bias=False,
        gather_output=False,
        skip_bias_add=True,
        disable_grad_reduce=True,
    )


def build_row_projection(submodules: ProjectionSubmodules, config, in_size: int, out_size: int,
                         init_method):
    """The mixer's output projection (reduce, or reduce-scatter under sequence parallelism)."""
    return build_module(
        submodules.row_linear,
        in_size,
        out_size,
        config=config,
        init_method=init_method,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=True,
        is_expert=False,
    )
