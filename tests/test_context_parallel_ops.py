"""Context-parallel operators equal the unsharded computation, outputs and every input gradient.

One spawn of four gloo processes runs every check for CP 2 (megatron's CP groups) and CP 4 (the
whole world), because starting processes costs seconds; a failing check raises inside the rank
with the offending numbers.
"""
import pytest
import torch
import torch.nn.functional as F

from megatron_rwkvx.testing.distributed import initialize_parallel, run_distributed

RTOL = 1e-5


def _assert_close(name, got, want, rtol=RTOL):
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != expected {tuple(want.shape)}")
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    if not err <= rtol * max(scale, 1e-30):
        raise AssertionError(f"{name}: max abs error {err:.3e} > {rtol} x max |expected| {scale:.3e}")


def _wkv_inputs(B, T, H, N, seed):
    """Inputs shaped like the model's: log decay in (-0.61, 0), a = -kk, b = kk * rate.

    Most decays are mild (sigmoid of mostly negative logits) so that a shard's initial state
    still matters at its end and a wrong hand-off between ranks shows at the 1e-5 level.
    """
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) * 0.5 for _ in range(3))
    w = -0.606531 * torch.sigmoid(2 * torch.randn(B, T, H, N, generator=g) - 3)
    kk = F.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    rate = torch.sigmoid(torch.randn(B, T, H, N, generator=g))
    return [r, w, k, v, -kk, kk * rate]


# ---------------------------------------------------------------- single process: the algebra


@pytest.mark.parametrize("backend", ["chunked", "naive"])
def test_shard_summary_composes_on_the_right(backend):
    from megatron_rwkvx.kernels.wkv7 import wkv7
    from megatron_rwkvx.parallel.context_parallel import wkv7_shard_summary

    B, T, H, N, cut = 2, 40, 2, 8, 17
    x = _wkv_inputs(B, T, H, N, seed=3)
    _, s_full = wkv7(*x, backend=backend)
    _, s_in = wkv7(*(t[:, :cut] for t in x), backend=backend)
    m, s_loc = wkv7_shard_summary(*(t[:, cut:] for t in x), backend=backend)
    _assert_close("S_in @ M + S_loc", s_in @ m + s_loc, s_full)
    # The transition acts on the right of the state; the other order must be visibly wrong.
    assert (m @ s_in + s_loc - s_full).abs().max() > 1e-2


def test_chunk_boundary_error_names_the_fix():
    from megatron_rwkvx.parallel.context_parallel import check_context_parallel_chunking

    check_context_parallel_chunking(16, 4, 8)
    with pytest.raises(ValueError) as info:
        check_context_parallel_chunking(12, 4, 8)
    msg = str(info.value)
    for part in (
        "sequence length 48", "context-parallel size 4", "chunk size 8",
        "multiple of cp * chunk_size = 32",
    ):
        assert part in msg, msg


# ---------------------------------------------------------------- several ranks


def _check_split_gather(rank, world, group):
    from megatron_rwkvx.parallel.context_parallel import (
        gather_from_context_parallel,
        split_for_context_parallel,
    )

    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 100, (2, 8 * world), generator=g)
    local = split_for_context_parallel(tokens, dim=1, group=group)
    assert torch.equal(local, tokens[:, rank * 8:(rank + 1) * 8])
    assert torch.equal(gather_from_context_parallel(local, dim=-1, group=group), tokens)
    try:
        split_for_context_parallel(tokens[:, :-1], dim=1, group=group)
    except ValueError as exc:
        assert "not divisible by the context-parallel size" in str(exc), exc
    else:
        raise AssertionError("splitting a length not divisible by the CP size did not raise")

    # Replicated input -> split -> per-rank op -> gather -> replicated loss: the gradient of the
    # input is that of one copy of the computation (megatron's scatter/gather convention).
    x = torch.randn(8 * world, 2, 3, generator=g, requires_grad=True)
    weight = torch.randn(8 * world, 2, 3, generator=g)
    out = gather_from_context_parallel(
        split_for_context_parallel(x, dim=0, group=group) ** 2, dim=0, group=group
    )
    _assert_close("gather(split(x)^2)", out, x.detach() ** 2)
    (out * weight).sum().backward()
    _assert_close("grad through split/gather", x.grad, 2 * x.detach() * weight)


def _check_previous_token(rank, world, group):
    from megatron_rwkvx.layers.token_shift import token_shift_delta
    from megatron_rwkvx.parallel.context_parallel import previous_token_from_prev_rank

    S, B, C = 8, 2, 6
    g = torch.Generator().manual_seed(7)
    x_full = torch.randn(S * world, B, C, generator=g, requires_grad=True)
    weight = torch.randn(S * world, B, C, generator=g)
    (token_shift_delta(x_full) ** 2 * weight).sum().backward()

    part = slice(rank * S, (rank + 1) * S)
    x = x_full.detach()[part].clone().requires_grad_()
    prev = previous_token_from_prev_rank(x, group)
    want_prev = x_full.detach()[rank * S - 1] if rank else torch.zeros(B, C)
    assert torch.equal(prev, want_prev), f"rank {rank}: wrong previous token"
    (token_shift_delta(x, prev) ** 2 * weight[part]).sum().backward()
    _assert_close(f"rank {rank} token-shift grad", x.grad, x_full.grad[part])


def _check_wkv7(rank, world, group, B, H, N, S):
    from megatron_rwkvx.kernels.wkv7 import wkv7
    from megatron_rwkvx.parallel.context_parallel import wkv7_context_parallel

    T = S * world
    full = [t.requires_grad_() for t in _wkv_inputs(B, T, H, N, seed=11)]
    g = torch.Generator().manual_seed(12)
    gy = torch.randn(B, T, H, N, generator=g)
    g_states = torch.randn(world, B, H, N, N, generator=g)

    # Reference: one unsharded call for y, the shard boundary states from a prefix chain.
    y_ref, final_ref = wkv7(*full, backend="chunked")
    states, state = [], None
    for j in range(world):
        _, state = wkv7(*(t[:, j * S:(j + 1) * S] for t in full), state, backend="chunked")
        states.append(state)
    _assert_close("prefix chain final state", states[-1], final_ref)
    loss = (y_ref * gy).sum() + sum((s * gs).sum() for s, gs in zip(states, g_states))
    loss.backward()

    part = slice(rank * S, (rank + 1) * S)
    local = [t.detach()[:, part].clone().requires_grad_() for t in full]
    y, final = wkv7_context_parallel(
        *local, group=group, backend="chunked",
        return_final_state=True,
    )
    _assert_close(f"rank {rank} y", y, y_ref.detach()[:, part])
    _assert_close(f"rank {rank} state after shard", final, states[rank].detach())
    ((y * gy[:, part]).sum() + (final * g_states[rank]).sum()).backward()
    for name, mine, ref in zip("rwkvab", local, full):
        _assert_close(f"rank {rank} grad {name}", mine.grad, ref.grad[:, part])

    # bf16 inputs without autograd (evaluation): the states stay fp32, y comes back in bf16.
    with torch.no_grad():
        y16 = wkv7_context_parallel(
            *(t.detach().bfloat16() for t in local), group=group, backend="chunked"
        )
        y16_ref, _ = wkv7(*(t.detach().bfloat16() for t in full), backend="chunked")
    assert y16.dtype == torch.bfloat16
    _assert_close(f"rank {rank} bf16 y", y16.float(), y16_ref[:, part].float(), rtol=2e-2)


def _check_sparse_attention(rank, world, group, B, Hq, Hkv, D, S, chunk, top_k):
    from megatron_rwkvx.kernels.sparse_attention import topk_chunk_attention
    from megatron_rwkvx.parallel.context_parallel import topk_chunk_attention_context_parallel

    T = S * world
    g = torch.Generator().manual_seed(21)
    q = torch.randn(B, T, Hq, D, generator=g, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, generator=g, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, generator=g, requires_grad=True)
    go = torch.randn(B, T, Hq, D, generator=g)
    part = slice(rank * S, (rank + 1) * S)
    for selection in ("mean", "quest"):  # each rank scores the chunks of every earlier rank
        for t in (q, k, v):
            t.grad = None
        out_ref = topk_chunk_attention(q, k, v, chunk_size=chunk, top_k=top_k, backend="torch",
                                       selection=selection)
        (out_ref * go).sum().backward()
        ql, kl, vl = (t.detach()[:, part].clone().requires_grad_() for t in (q, k, v))
        out = topk_chunk_attention_context_parallel(
            ql, kl, vl, chunk_size=chunk, top_k=top_k, group=group, backend="torch", selection=selection
        )
        _assert_close(f"rank {rank} attention out ({selection})", out, out_ref.detach()[:, part])
        (out * go[:, part]).sum().backward()
        for name, mine, ref in (("q", ql, q), ("k", kl, k), ("v", vl, v)):
            _assert_close(f"rank {rank} attention grad {name} ({selection})", mine.grad, ref.grad[:, part])

    # A shard that is not a whole number of chunks: every rank refuses before communicating.
    try:
        topk_chunk_attention_context_parallel(
            ql[:, :-2], kl[:, :-2], vl[:, :-2], chunk_size=chunk, top_k=top_k, group=group
        )
    except ValueError as exc:
        assert f"context-parallel size {world}" in str(exc) and "chunk size" in str(exc), exc
    else:
        raise AssertionError("a shard not on chunk boundaries did not raise")


def _run_checks(group, shapes):
    from megatron_rwkvx.parallel.context_parallel import resolve_group

    cp_group = resolve_group(group)
    rank, world = torch.distributed.get_rank(cp_group), torch.distributed.get_world_size(cp_group)
    _check_split_gather(rank, world, group)
    _check_previous_token(rank, world, group)
    _check_wkv7(rank, world, group, **shapes["wkv"])
    _check_sparse_attention(rank, world, group, **shapes["attention"])


CP2_SHAPES = dict(
    wkv=dict(B=2, H=2, N=8, S=16),
    attention=dict(B=2, Hq=2, Hkv=2, D=8, S=16, chunk=4, top_k=3),
)
CP4_SHAPES = dict(
    wkv=dict(B=1, H=2, N=16, S=16),
    attention=dict(B=1, Hq=4, Hkv=2, D=8, S=8, chunk=4, top_k=2),
)


def _cp_body(rank, world):
    # Four processes test both sizes (a spawn costs seconds): first megatron's own CP groups of
    # size 2, [0, 1] and [2, 3], through the default group (the second one's ranks differ from
    # the global ranks, as in real layouts), then the whole world as one CP group of size 4.
    initialize_parallel(context_parallel_size=2)
    _run_checks(None, CP2_SHAPES)
    _run_checks(torch.distributed.new_group(list(range(world))), CP4_SHAPES)
    return True


@pytest.mark.distributed
def test_context_parallel_ops_equal_unsharded():
    assert run_distributed(_cp_body, 4) == [True] * 4
