"""The chunked WKV-7 backend's written-out backward (``kernels/wkv7/chunked_grad.py``): float64
gradcheck of the segment-wise Function, on both pair-product paths and across segment
boundaries, and its gradients against the token loop's for every input, the initial state and a
loss on the final state (the one context parallelism back-propagates through)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_rwkvx.kernels.wkv7 import chunked, wkv7


def _inputs(G, T, N, w_min, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    r, k, v = randn(G, T, N), randn(G, T, N), randn(G, T, N)
    w = w_min * torch.rand(G, T, N, generator=gen, dtype=dtype).clamp_min(1e-3)
    kk = F.normalize(randn(G, T, N), dim=-1)
    a, b = -kk, kk * torch.rand(G, T, N, generator=gen, dtype=dtype)
    return [r, w, k, v, a, b, randn(G, N, N)]


@pytest.mark.parametrize(
    "factored,w_min,chunk",
    [
        (True, -0.6, 4),  # the model's decays: one product per chunk
        (False, -3.0, 4),  # the exact divide-and-conquer pair products
        (False, -0.6, 8),
        (True, -0.6, 1),  # one token per chunk: only the state pass
    ],
)
def test_gradcheck_float64_across_segments(monkeypatch, factored, w_min, chunk):
    G, T, N = 2, max(16, 4 * chunk), 3
    # Segments of two chunks: the state gradient is carried across several segment boundaries.
    monkeypatch.setattr(chunked, "_SEGMENT_ELEMENTS", G * N * chunk * 2)
    assert len(chunked._segment_bounds(T, G, N, chunk)) > 1
    inputs = [x.requires_grad_() for x in _inputs(G, T, N, w_min, seed=chunk)]
    assert torch.autograd.gradcheck(
        lambda *x: chunked._ChunkedWKV7.apply(*x, chunk, factored), inputs, eps=1e-6, atol=1e-8, rtol=1e-6
    )


def _token_loop(r, w, k, v, a, b, S):
    """The recurrence in the inputs' dtype (float64 here), ``[G, T, N]`` layout."""
    ys = []
    for t in range(r.shape[1]):
        S = (S * torch.exp(w[:, t, None, :]) + (S @ a[:, t, :, None]) @ b[:, t, None, :]
             + v[:, t, :, None] @ k[:, t, None, :])
        ys.append((S @ r[:, t, :, None])[..., 0])
    return torch.stack(ys, 1), S


@pytest.mark.parametrize("factored,w_min", [(True, -0.6), (False, -5.0)])
def test_gradients_equal_the_token_loop_for_every_input(monkeypatch, factored, w_min):
    G, T, N, chunk = 3, 48, 8, 8
    monkeypatch.setattr(chunked, "_SEGMENT_ELEMENTS", G * N * chunk * 2)
    inputs = [x.requires_grad_() for x in _inputs(G, T, N, w_min, seed=11)]
    gen = torch.Generator().manual_seed(12)
    gy = torch.randn(G, T, N, generator=gen, dtype=torch.float64)
    gs = torch.randn(G, N, N, generator=gen, dtype=torch.float64)
    got = chunked._ChunkedWKV7.apply(*inputs, chunk, factored)
    ref = _token_loop(*inputs)
    names = ["dr", "dw", "dk", "dv", "da", "db", "dinitial_state"]
    got_grads = torch.autograd.grad(got, inputs, (gy, gs))
    ref_grads = torch.autograd.grad(ref, inputs, (gy, gs))
    for name, x, xr in zip(names, got_grads, ref_grads):
        assert ((x - xr).abs().max() / xr.abs().max()).item() < 1e-10, name
    # The final-state gradient alone (context parallelism's pass through S_out = S_in M + S_loc).
    # r only reaches y: its gradient is zero (the loop's is unused, materialised as zeros).
    got_grads = torch.autograd.grad(chunked._ChunkedWKV7.apply(*inputs, chunk, factored)[1], inputs, gs)
    ref_grads = torch.autograd.grad(_token_loop(*inputs)[1], inputs, gs, materialize_grads=True)
    assert torch.equal(got_grads[0], ref_grads[0])
    for name, x, xr in zip(names[1:], got_grads[1:], ref_grads[1:]):
        assert ((x - xr).abs().max() / xr.abs().max()).item() < 1e-10, name


def test_public_op_returns_only_the_wanted_gradients_and_matches_naive(monkeypatch):
    """Through ``wkv7`` (fp32, padded T, several segments): inputs without requires_grad get none,
    and those that have it match the naive reference's."""
    B, T, H, N = 1, 45, 2, 16
    monkeypatch.setattr(chunked, "_SEGMENT_ELEMENTS", B * H * N * 16 * 2)
    r, w, k, v, a, b, state = (x.float() for x in _inputs(B * H, T, N, -0.6, seed=13))
    inputs = [x.view(B, H, T, N).transpose(1, 2).contiguous() for x in (r, w, k, v, a, b)]
    state = state.view(B, H, N, N)
    grads = {}
    for backend in ("naive", "chunked"):
        leaves = [x.clone().requires_grad_(i in (1, 3)) for i, x in enumerate(inputs)]
        s0 = state.clone().requires_grad_()
        y, s = wkv7(*leaves, s0, backend=backend)
        (y.square().sum() + (s * state).sum()).backward()
        assert all(x.grad is None for i, x in enumerate(leaves) if i not in (1, 3))
        grads[backend] = [leaves[1].grad, leaves[3].grad, s0.grad]
    for x, xr in zip(grads["chunked"], grads["naive"]):
        assert ((x - xr).abs().max() / xr.abs().max()).item() < 1e-5
