"""The RWKV-7 WKV operator: the naive reference pinned to the official formula, the chunked backend
against it (values and every gradient), state hand-over, low precision and input errors.

Relative error everywhere is ``max|x - ref| / max|ref|`` over the whole tensor.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_rwkvx.kernels import wkv7 as wkv7_pkg
from megatron_rwkvx.kernels.wkv7 import dispatch, wkv7, wkv7_chunked

LOG_DECAY_MIN = -0.6065  # -exp(-0.5): the model's range of log w


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def model_like_inputs(B, T, H, N, *, w_min=LOG_DECAY_MIN, seed=0, dtype=torch.float32):
    """Inputs shaped like the model's: a = -kk, b = kk * rate with kk unit-norm per head."""
    gen = torch.Generator().manual_seed(seed)

    def randn():
        return torch.randn(B, T, H, N, generator=gen)

    r, k, v = randn(), randn(), randn()
    w = w_min * torch.rand(B, T, H, N, generator=gen).clamp_min(1e-4)
    kk = F.normalize(randn(), dim=-1)
    a, b = -kk, kk * torch.sigmoid(randn())
    return [t.to(dtype) for t in (r, w, k, v, a, b)]


def run_with_grads(backend, inputs, state, gy, gs, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    s0 = state.detach().clone().requires_grad_()
    y, s = wkv7(*leaves, s0, backend=backend, **kw)
    grads = torch.autograd.grad((y, s), leaves + [s0], (gy, gs))
    return [y, s, *grads]


NAMES = ["y", "final_state", "dr", "dw", "dk", "dv", "da", "db", "dinitial_state"]


@pytest.mark.parametrize(
    "T,N,w_min,chunk",
    [
        (32, 8, LOG_DECAY_MIN, None),  # a multiple of the chunk
        (45, 16, LOG_DECAY_MIN, None),  # not a multiple: padded
        (45, 16, -5.0, None),  # strong decay: past the factored form's limit, the exact pair products
        (45, 16, -3.6, None),  # factored near its limit (16 * 3.6 = 57.6 <= 60)
        (37, 8, LOG_DECAY_MIN, 32),
        (9, 8, -2.0, 1),  # a chunk of one token: only the sequential pass
        (40, 64, LOG_DECAY_MIN, None),  # the model's head size
    ],
)
def test_chunked_matches_naive_values_and_all_gradients(T, N, w_min, chunk):
    B, H = 2, 2
    inputs = model_like_inputs(B, T, H, N, w_min=w_min, seed=T + N)
    gen = torch.Generator().manual_seed(1)
    state = 0.5 * torch.randn(B, H, N, N, generator=gen)
    gy = torch.randn(B, T, H, N, generator=gen)
    gs = torch.randn(B, H, N, N, generator=gen)
    ref = run_with_grads("naive", inputs, state, gy, gs)
    got = run_with_grads("chunked", inputs, state, gy, gs, chunk_size=chunk)
    for name, x, xr in zip(NAMES, got, ref):
        assert x.shape == xr.shape and x.dtype == xr.dtype, name
        assert rel_err(x, xr) < 1e-5, (name, rel_err(x, xr))


def test_factored_pair_products_equal_the_exact_ones_and_are_chosen_by_the_decay_bound():
    from megatron_rwkvx.kernels.wkv7 import chunked
    from megatron_rwkvx.kernels.wkv7.checks import factored_pairs_fit

    gen = torch.Generator().manual_seed(3)
    D, L, N = 6, 16, 16
    w = -3.6 * torch.sigmoid(torch.randn(D, L, N, generator=gen, dtype=torch.float64) + 3)
    g = w.cumsum(1)
    q_log = torch.stack((F.pad(g[:, :-1], (0, 0, 1, 0)), g), dim=1)
    q, keys = (torch.randn(D, 2, L, N, generator=gen, dtype=torch.float64) for _ in range(2))
    exact = chunked._pair_matrices(q, q_log, keys, g)
    assert rel_err(chunked._pair_matrices_factored(q, q_log, keys, g), exact) < 1e-12
    assert factored_pairs_fit(16, LOG_DECAY_MIN) and factored_pairs_fit(64, LOG_DECAY_MIN)
    assert not factored_pairs_fit(16, -5.0)


def official_recurrence(r, w, k, v, a, b, state):
    """Direct transcription of the official RWKV-7 update, one scalar at a time, in float64:
    ``state = state * w_decay[None, :] + state @ (a b^T) + v k^T``, ``y = state @ r``."""
    B, T, H, N = r.shape
    y = torch.zeros(B, T, H, N, dtype=torch.float64)
    S = state.double().clone()
    for bi in range(B):
        for h in range(H):
            for t in range(T):
                decay = [float(torch.exp(w[bi, t, h, j].double())) for j in range(N)]
                sa = [sum(float(S[bi, h, i, l]) * float(a[bi, t, h, l]) for l in range(N)) for i in range(N)]
                for i in range(N):
                    for j in range(N):
                        S[bi, h, i, j] = (
                            S[bi, h, i, j] * decay[j]
                            + sa[i] * float(b[bi, t, h, j])
                            + float(v[bi, t, h, i]) * float(k[bi, t, h, j])
                        )
                for i in range(N):
                    y[bi, t, h, i] = sum(float(S[bi, h, i, j]) * float(r[bi, t, h, j]) for j in range(N))
    return y, S


def test_naive_matches_a_transcription_of_the_official_formula():
    inputs = model_like_inputs(1, 6, 2, 4, seed=3)
    state = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    y_ref, s_ref = official_recurrence(*inputs, state)
    y, s = wkv7(*inputs, state, backend="naive")
    assert rel_err(y, y_ref) < 1e-6 and rel_err(s, s_ref) < 1e-6
    # State rows are the value dim: the layout is [N_v, N_k], not its transpose.
    assert rel_err(s.transpose(-1, -2), s_ref) > 1e-2


@pytest.mark.parametrize("backend", ["naive", "chunked"])
def test_two_halves_with_state_handover_equal_the_whole(backend):
    inputs = model_like_inputs(2, 50, 2, 16, seed=5)
    state = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(6))
    y_all, s_all = wkv7(*inputs, state, backend=backend)
    y1, s1 = wkv7(*(t[:, :21] for t in inputs), state, backend=backend)
    y2, s2 = wkv7(*(t[:, 21:] for t in inputs), s1, backend=backend)
    assert rel_err(torch.cat((y1, y2), dim=1), y_all) < 1e-5
    assert rel_err(s2, s_all) < 1e-5


def test_state_transition_identity_used_by_context_parallelism():
    """S_out = S_in M + S_loc with M from (v = 0, S_in = I) and S_loc from (S_in = 0)."""
    B, T, H, N = 1, 40, 2, 16
    r, w, k, v, a, b = model_like_inputs(B, T, H, N, seed=7)
    s_in = torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(8))
    eye = torch.eye(N).expand(B, H, N, N).contiguous()
    _, M = wkv7(r, w, k, torch.zeros_like(v), a, b, eye, backend="chunked")
    _, s_loc = wkv7(r, w, k, v, a, b, None, backend="chunked")
    _, s_out = wkv7(r, w, k, v, a, b, s_in, backend="chunked")
    assert rel_err(s_in @ M + s_loc, s_out) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("backend", ["naive", "chunked"])
def test_low_precision_inputs_run_and_match_fp32(backend, dtype, tol):
    inputs = model_like_inputs(2, 24, 2, 16, seed=9, dtype=dtype)
    y, s = wkv7(*inputs, backend=backend)
    assert y.dtype == dtype and s.dtype == torch.float32
    y32, s32 = wkv7(*(t.float() for t in inputs), backend=backend)
    assert rel_err(y, y32) < tol and rel_err(s, s32) < 1e-5


def test_empty_sequence_returns_the_initial_state():
    r, w, k, v, a, b = model_like_inputs(2, 0, 2, 8)
    state = torch.randn(2, 2, 8, 8)
    y, s = wkv7(r, w, k, v, a, b, state)
    assert y.shape == (2, 0, 2, 8) and torch.equal(s, state) and s is not state


def test_chunked_saves_inputs_and_per_segment_states_only():
    """Memory for backward: the chunked backend must not keep per-token (or per-chunk) states."""
    B, T, H, N = 1, 512, 2, 16
    inputs = [t.requires_grad_() for t in model_like_inputs(B, T, H, N, seed=10)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        wkv7(*inputs, backend="chunked")
    input_elems = sum(t.numel() for t in inputs)
    assert sum(saved) < 2 * input_elems, (sum(saved), input_elems)
    # The naive reference, for contrast, keeps a state per token.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        wkv7(*inputs, backend="naive")
    assert sum(saved) > T * H * N * N


def test_auto_uses_chunked_on_cpu_and_lists_backends():
    r = torch.zeros(1, 1, 1, 4)
    assert dispatch.resolve_backend("auto", r) is wkv7_chunked
    assert {"reference", "torch"} <= set(wkv7_pkg.available_backends(r))


def test_a_registered_backend_is_called_with_validated_inputs(monkeypatch):
    calls = []

    def fake(r, w, k, v, a, b, initial_state, chunk_size):
        calls.append(chunk_size)
        return wkv7_chunked(r, w, k, v, a, b, initial_state, chunk_size)

    monkeypatch.setattr(dispatch.WKV7, "_backends", dict(dispatch.WKV7._backends))
    dispatch.register_backend("fake", fake)
    inputs = model_like_inputs(1, 5, 1, 4, dtype=torch.bfloat16)
    y, s = wkv7(*inputs, backend="fake", chunk_size=4)
    assert calls == [4] and y.dtype == torch.bfloat16 and s.dtype == torch.float32


def _ok_inputs():
    return model_like_inputs(1, 4, 2, 8)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda x, s: (x[:1] + [x[1][0]] + x[2:], s), ValueError, r"\[B, T, H, N\]"),
        (lambda x, s: (x[:2] + [x[2][..., :4]] + x[3:], s), ValueError, "share r's shape"),
        (lambda x, s: (x[:3] + [x[3].half()] + x[4:], s), TypeError, "share r's dtype"),
        (lambda x, s: ([t.double() for t in x], s), TypeError, "float32, float16 or bfloat16"),
        (lambda x, s: (x, torch.zeros(1, 2, 8, 4)), ValueError, r"initial_state must have shape"),
        (lambda x, s: (x, torch.zeros(1, 2, 8, 8, dtype=torch.bfloat16)), TypeError, "float32"),
        (lambda x, s: (x[:4] + [x[4].numpy()] + x[5:], s), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, exc, match):
    inputs, state = mutate(_ok_inputs(), None)
    with pytest.raises(exc, match=match):
        wkv7(*inputs, state)


def test_bad_backends_and_options_raise_clear_errors():
    inputs = _ok_inputs()
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'.*chunked.*naive"):
        wkv7(*inputs, backend="cuda")
    # Either the Triton module is missing/broken or it is registered but cannot run on the CPU.
    with pytest.raises(RuntimeError, match=r"'triton' (is unavailable|cannot run on device cpu).*chunked"):
        wkv7(*inputs, backend="triton")
    if "fla" not in wkv7_pkg.available_backends():
        with pytest.raises(RuntimeError, match="'fla' is not installed"):
            wkv7(*inputs, backend="fla")
    with pytest.raises(ValueError, match="power of two"):
        wkv7(*inputs, backend="chunked", chunk_size=12)
    bad_w = list(inputs)
    bad_w[1] = -bad_w[1]
    with pytest.raises(ValueError, match="log decay"):
        wkv7(*bad_w, backend="chunked")
