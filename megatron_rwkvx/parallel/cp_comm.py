"""Differentiable context-parallel communication: contiguous split/gather and the token hand-off.

The sequence is split contiguously: CP rank ``r`` of ``cp`` holds positions
``[r * T / cp, (r + 1) * T / cp)``. Every function takes the CP process group (default: megatron's
``parallel_state.get_context_parallel_group()``) and uses only all_gather, all_reduce and
point-to-point sends, because gloo (the CPU backend) has no reduce_scatter.

Autograd and collectives: a collective in a backward pass runs only on the ranks whose loss
reaches the node that issued it, yet it needs every rank of the group. Each function here
therefore returns a tensor that every rank uses (none returns None on some ranks only), so that
every rank's graph holds the node and every rank enters its backward.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def resolve_group(group: Optional[dist.ProcessGroup]) -> dist.ProcessGroup:
    """``group``, or megatron's context-parallel group when None."""
    if group is not None:
        return group
    if not dist.is_initialized():
        raise RuntimeError(
            "context parallelism needs torch.distributed: call torch.distributed.init_process_group "
            "and megatron.core.parallel_state.initialize_model_parallel(context_parallel_size=...) "
            "first, or pass the process group explicitly"
        )
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron's parallel groups are not initialised: call "
            "megatron.core.parallel_state.initialize_model_parallel(context_parallel_size=...) first, "
            "or pass the context-parallel process group explicitly"
        )
    return parallel_state.get_context_parallel_group()


def all_gather_list(t: torch.Tensor, group: dist.ProcessGroup) -> List[torch.Tensor]:
    """Every rank's ``t``, in rank order (no autograd: the callers define the backward)."""
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return parts


def _local_slice(t: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    local = t.shape[dim] // size
    return t.narrow(dim, dist.get_rank(group) * local, local)


def _check_divisible(length: int, dim: int, size: int) -> None:
    if length % size:
        raise ValueError(
            f"context parallelism splits dim {dim} (length {length}) into {size} contiguous "
            f"equal parts, but {length} is not divisible by the context-parallel size {size}; "
            f"use a sequence length that is a multiple of {size} (pad the batch or change "
            "--seq-length / --context-parallel-size)"
        )


class _SplitToContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _local_slice(x, dim, group).clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.cat(all_gather_list(grad, ctx.group), dim=ctx.dim), None, None


class _GatherFromContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return torch.cat(all_gather_list(x, group), dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return _local_slice(grad, ctx.dim, ctx.group).clone(), None, None


class _AllGatherSumGrad(_GatherFromContextParallel):
    """The same gather; only the backward differs."""

    @staticmethod
    def backward(ctx, grad):
        # Every rank used the gathered tensor differently: the gradient of a rank's own part is
        # the sum over ranks (gloo has no reduce_scatter, so all_reduce then keep our slice).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return _local_slice(grad, ctx.dim, ctx.group).clone(), None, None


def split_for_context_parallel(
    tensor: torch.Tensor, dim: int, group: Optional[dist.ProcessGroup] = None
) -> torch.Tensor:
    """This rank's contiguous part of ``tensor`` along ``dim`` (the full tensor on every rank).

    For batches (token ids, labels, loss masks: dim 1 of ``[B, T]``) and for replicated
    activations. Backward all-gathers, as megatron's scatter-to-region mappings do: the input is
    taken to be identical on every rank. Raises a ValueError when the length of ``dim`` is not
    divisible by the CP size. Unlike megatron's ``get_batch_on_this_cp_rank`` (a zig-zag split
    for causal attention), the split is contiguous, which the recurrence needs.
    """
    group = resolve_group(group)
    size = dist.get_world_size(group)
    dim = dim % tensor.dim()
    _check_divisible(tensor.shape[dim], dim, size)
    if size == 1:
        return tensor
    if not tensor.requires_grad:
        return _local_slice(tensor, dim, group)
    return _SplitToContextParallel.apply(tensor, dim, group)


def gather_from_context_parallel(
    tensor: torch.Tensor, dim: int, group: Optional[dist.ProcessGroup] = None
) -> torch.Tensor:
    """Concatenate every rank's part along ``dim``, in rank order (the inverse of the split).

    Backward keeps this rank's slice of the gradient, as megatron's gather-from-region mappings
    do: what follows is taken to be computed identically on every rank (for example an
    evaluation on the full output). When each rank uses the gathered tensor differently (K/V of
    attention), use :func:`all_gather_sum_grad` instead. Every rank must pass the same shape.
    """
    return _gather(tensor, dim, group, _GatherFromContextParallel)


def all_gather_sum_grad(
    tensor: torch.Tensor, dim: int, group: Optional[dist.ProcessGroup] = None
) -> torch.Tensor:
    """All-gather along ``dim`` whose backward sums the gradients of all ranks, then slices.

    The right mapping when every rank consumes the gathered tensor in its own way (each rank's
    loss is one term of the total loss), as attention does with gathered keys and values.
    Every rank must pass the same shape, and every rank must use the result (its backward is a
    collective).
    """
    return _gather(tensor, dim, group, _AllGatherSumGrad)


def _gather(tensor, dim, group, function) -> torch.Tensor:
    """The concatenation along ``dim`` of every rank's part, with ``function``'s backward."""
    group = resolve_group(group)
    if dist.get_world_size(group) == 1:
        return tensor
    dim = dim % tensor.dim()
    if not tensor.requires_grad:
        return torch.cat(all_gather_list(tensor, group), dim=dim)
    return function.apply(tensor, dim, group)


def _exchange_with_neighbours(
    send_next: Optional[torch.Tensor],
    recv_prev: Optional[torch.Tensor],
    send_prev: Optional[torch.Tensor],
    recv_next: Optional[torch.Tensor],
    group: dist.ProcessGroup,
) -> None:
    rank = dist.get_rank(group)
    ops = []
    if send_next is not None:
        ops.append(dist.P2POp(dist.isend, send_next, dist.get_global_rank(group, rank + 1), group))
    if recv_prev is not None:
        ops.append(dist.P2POp(dist.irecv, recv_prev, dist.get_global_rank(group, rank - 1), group))
    if send_prev is not None:
        ops.append(dist.P2POp(dist.isend, send_prev, dist.get_global_rank(group, rank - 1), group))
    if recv_next is not None:
        ops.append(dist.P2POp(dist.irecv, recv_next, dist.get_global_rank(group, rank + 1), group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class _PreviousToken(torch.autograd.Function):
    @staticmethod
    def forward(ctx, last, group):
        ctx.group = group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        last = last.contiguous()
        received = torch.zeros_like(last)
        _exchange_with_neighbours(
            last if rank < size - 1 else None, received if rank > 0 else None, None, None, group
        )
        return received

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        grad = grad.contiguous()
        grad_last = torch.zeros_like(grad)
        _exchange_with_neighbours(
            None, None, grad if rank > 0 else None, grad_last if rank < size - 1 else None, group
        )
        return grad_last, None


def previous_token_from_prev_rank(
    x_local: torch.Tensor, group: Optional[dist.ProcessGroup] = None
) -> Optional[torch.Tensor]:
    """The last token ``[B, C]`` of the previous CP rank's ``x_local`` (``[S_local, B, C]``).

    For token shift across shard boundaries: pass the result as ``previous_token``. Its gradient
    is sent back to the previous rank and added to the gradient of that rank's last token.

    Rank 0 gets **zeros** (the token before the sequence start, as token shift assumes), not
    None: they are an output of the exchange, so rank 0's backward takes part in the
    point-to-point hand-off that rank 1's backward starts. Use the result on every rank;
    replacing rank 0's zeros by None would make rank 0 skip the backward and rank 1 wait
    forever. With a CP size of 1 there is nothing to exchange and the result is None.
    """
    if x_local.dim() != 3:
        raise ValueError(
            f"x_local must be [S_local, B, C] (megatron's sequence-first layout), got shape "
            f"{tuple(x_local.shape)}"
        )
    group = resolve_group(group)
    if dist.get_world_size(group) == 1:
        return None
    if x_local.shape[0] == 0:
        raise ValueError(
            "x_local has no tokens on this rank; every context-parallel rank needs at least one "
            "(use a sequence length of at least the context-parallel size)"
        )
    return _PreviousToken.apply(x_local[-1], group)
