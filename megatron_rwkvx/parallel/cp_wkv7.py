"""Context parallelism for the RWKV-7 recurrence by state passing (exact, differentiable).

Per head the recurrence is affine in the state: ``S_t = S_{t-1} G_t + v_t k_t^T`` with the
transition ``G_t = diag(exp w_t) + a_t b_t^T`` multiplying the state on the RIGHT (rows of S are
the value dim, columns the key dim). Over a shard of tokens, therefore,
``S_out = S_in M + S_loc`` with ``M = G_1 ... G_T`` (the kernel run from ``S_in = I`` with
``v = 0``) and ``S_loc`` (the kernel run from ``S_in = 0``). Each rank computes its ``(M, S_loc)``,
all-gathers them (``2 B H N^2`` fp32 values, whatever the shard length), folds its predecessors
into its initial state and reruns its shard from it. docs/parallelism.md gives the costs.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from megatron_rwkvx.kernels.wkv7 import wkv7
from megatron_rwkvx.kernels.wkv7.checks import check_inputs

from .cp_comm import all_gather_list, resolve_group


def wkv7_shard_summary(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(M, S_loc)`` of a shard, both fp32 ``[B, H, N, N]``: its final state is ``S_in @ M + S_loc``.

    One kernel call on a doubled batch: the first half runs from the identity with ``v = 0``
    (giving the transition product M), the second from zeros with the real ``v`` (giving S_loc).
    Differentiable in w, k, v, a, b (the outputs ``y`` are discarded, so r gets no gradient).
    """
    B, _, H, N = r.shape
    eye = torch.eye(N, dtype=torch.float32, device=r.device).expand(B, H, N, N)
    init = torch.cat([eye, torch.zeros_like(eye)]).contiguous()
    r2 = r.detach()

    def twice(t):
        return torch.cat([t, t])

    _, final = wkv7(
        twice(r2), twice(w), twice(k), torch.cat([torch.zeros_like(v), v]), twice(a), twice(b),
        init, backend=backend, chunk_size=chunk_size,
    )
    return final[:B], final[B:]


class _PrefixStateCombine(torch.autograd.Function):
    """All-gather every rank's ``(M, S_loc)`` and return ``S_in`` of this rank.

    ``S_in(0) = 0`` and ``S_in(j + 1) = S_in(j) M_j + S_loc_j``. A custom Function rather than
    plain autograd ops because rank 0 uses none of the gathered values: with plain ops rank 0's
    graph would not hold the gather, rank 0 would skip the all_reduce of the backward and the
    other ranks would wait forever. Here ``S_in`` is an output on every rank.
    """

    @staticmethod
    def forward(ctx, m_local, s_local, group):
        rank = dist.get_rank(group)
        gathered = torch.stack(all_gather_list(torch.stack([m_local, s_local]), group))
        state = torch.zeros_like(s_local)
        prefix = []
        for j in range(rank):
            prefix.append(state)
            state = state @ gathered[j, 0] + gathered[j, 1]
        ctx.group = group
        ctx.gathered_shape = gathered.shape
        ctx.save_for_backward(gathered[:rank, 0], *prefix)
        return state

    @staticmethod
    def backward(ctx, grad_state):
        group = ctx.group
        rank = dist.get_rank(group)
        saved = ctx.saved_tensors
        ms, prefix = saved[0], saved[1:]
        grads = grad_state.new_zeros(ctx.gathered_shape)
        g = grad_state
        for j in range(rank - 1, -1, -1):
            grads[j, 0] = prefix[j].transpose(-1, -2) @ g
            grads[j, 1] = g
            g = g @ ms[j].transpose(-1, -2)
        # Rank j's (M, S_loc) feeds every later rank: its gradient is the sum over ranks.
        dist.all_reduce(grads, group=group)
        return grads[rank, 0].clone(), grads[rank, 1].clone(), None


def wkv7_context_parallel(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
    backend: str = "auto",
    *,
    chunk_size: Optional[int] = None,
    return_final_state: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """``wkv7`` over a sequence split contiguously across the CP ranks; returns this rank's y.

    Inputs are this rank's shard, ``[B, T_local, H, N]`` (as for ``wkv7``); B, H, N must agree
    across ranks, T_local may differ. The whole sequence starts from the zero state. Exact and
    differentiable: the gradients of every rank's inputs equal the unsharded run's (the total
    loss being the sum of the ranks' losses). With ``return_final_state`` also returns the fp32
    state ``[B, H, N, N]`` after this rank's shard: on the last rank, the sequence's final state.

    Cost: about twice the local kernel (a doubled-batch run for ``(M, S_loc)`` and the rerun)
    plus one all_gather of ``2 * cp * B * H * N^2`` fp32 values (one all_reduce of the same size
    in the backward). Every rank of ``group`` must call it (it is a collective).
    """
    # Validate before the doubled-batch call, whose errors would name doubled shapes.
    check_inputs((r, w, k, v, a, b), None)
    group = resolve_group(group)
    if dist.get_world_size(group) == 1:
        y, final = wkv7(r, w, k, v, a, b, backend=backend, chunk_size=chunk_size)
    else:
        m, s_loc = wkv7_shard_summary(r, w, k, v, a, b, backend=backend, chunk_size=chunk_size)
        s_in = _PrefixStateCombine.apply(m, s_loc, group)
        y, final = wkv7(r, w, k, v, a, b, s_in, backend=backend, chunk_size=chunk_size)
    return (y, final) if return_final_state else y
