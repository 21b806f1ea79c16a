"""Training losses: per-token cross entropy (with megatron's per-token loss convention), the LongCE
re-weighting of long-context training, and RWKV's L2Wrap logit regulariser.

The schedules are run with ``calculate_per_token_loss=True``: a loss function returns the *sum* of
the token losses and the token count; megatron divides the gradients by the total token count over
micro-batches and data-parallel ranks.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from megatron.core import parallel_state
from torch import Tensor

from megatron_rwkvx.layers.tensor_parallel_utils import whole_sequences_per_rank


def masked_token_loss(per_token_loss: Tensor, loss_mask: Tensor, weights: Tensor = None):
    """(loss sum, token count, report) for megatron's schedules."""
    losses = per_token_loss.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    weighted = losses * mask if weights is None else losses * mask * weights.float().reshape(-1)
    loss_sum = weighted.sum()
    num_tokens = mask.sum().to(torch.int)
    # The report carries the plain CE (not the LongCE-weighted one) so logs stay comparable.
    report = torch.stack([(losses * mask).sum().detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def longce_windows(seq_length: int, window: int, stride: int) -> List[Tuple[int, int, int]]:
    """Short-context windows as (start, scored_from, end): each window [start, end) scores its last
    ``stride`` tokens [scored_from, end), so every scored token sees window - stride to window - 1
    tokens of context. Positions below ``window`` are not scored (their weight stays 1)."""
    out = []
    start = stride
    while start + window <= seq_length:
        out.append((start, start + window - stride, start + window))
        start += stride
    tail_end = out[-1][2] if out else window
    if tail_end < seq_length and seq_length > window:
        # The last (partial) stretch: a window ending at the sequence end.
        start = seq_length - window
        out.append((start, tail_end, seq_length))
    return out


@torch.no_grad()
def longce_short_context_losses(
    model, tokens: Tensor, labels: Tensor, window: int, stride: int
) -> Tuple[Tensor, Tensor]:
    """Per-token CE of each token predicted from a short context, for all windows in batched
    forwards without gradient. Returns (short losses [B, S], scored mask [B, S]) of the whole
    sequence ``tokens`` [B, S].

    The windows are independent sequences: under context parallelism each CP rank (all of which
    hold the whole sequence) runs every cp-th window as a whole sequence, without the CP exchange,
    and one all-reduce over the CP group assembles the result (scored ranges are disjoint). Each
    data-parallel rank already has its own sequences and windows, so the work is even over DP x CP.
    """
    b, s = tokens.shape
    windows = longce_windows(s, window, stride)
    short = torch.zeros(b, s, dtype=torch.float32, device=tokens.device)
    scored = torch.zeros(b, s, dtype=torch.float32, device=tokens.device)
    cp = parallel_state.get_context_parallel_world_size()
    mine = windows[parallel_state.get_context_parallel_rank()::cp] if cp > 1 else windows
    if mine:
        toks = torch.stack([tokens[:, st:en] for st, _, en in mine], dim=1).reshape(-1, window)
        labs = torch.stack([labels[:, st:en] for st, _, en in mine], dim=1).reshape(-1, window)
        with whole_sequences_per_rank():
            losses = model(toks, labels=labs).float().reshape(b, len(mine), window)
        for i, (st, sc, en) in enumerate(mine):
            short[:, sc:en] = losses[:, i, sc - st :]
            scored[:, sc:en] = 1.0
    if cp > 1:
        both = torch.stack([short, scored])
        torch.distributed.all_reduce(both, group=parallel_state.get_context_parallel_group())
        short, scored = both[0], both[1]
    return short, scored.bool()


def longce_weights(long_losses: Tensor, short_losses: Tensor, scored: Tensor, tau: float) -> Tensor:
    """``w = min(exp(l_short - l_long), tau)`` on scored tokens, 1 elsewhere; no gradient."""
    w = torch.exp(short_losses - long_losses.detach().float()).clamp(max=tau)
    return torch.where(scored, w, torch.ones_like(w))


class L2Wrap(torch.autograd.Function):
    """RWKV's L2Wrap: identity forward; backward adds ``factor * max_logit`` to the gradient of
    each token's largest logit, discouraging logit growth. Works on vocabulary-parallel logits (the
    maximum is reduced over the tensor-parallel group)."""

    @staticmethod
    def forward(ctx, logits: Tensor, factor: float, tp_group) -> Tensor:
        ctx.save_for_backward(logits)
        ctx.factor = factor
        ctx.tp_group = tp_group
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (logits,) = ctx.saved_tensors
        local_max, local_idx = logits.max(dim=-1, keepdim=True)
        global_max = local_max.clone()
        if ctx.tp_group is not None and torch.distributed.get_world_size(ctx.tp_group) > 1:
            torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX, group=ctx.tp_group)
        owner = (local_max == global_max).to(logits.dtype)
        extra = torch.zeros_like(logits)
        extra.scatter_(-1, local_idx, global_max * ctx.factor * owner)
        return grad + extra, None, None
