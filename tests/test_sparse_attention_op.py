"""Top-k chunk sparse attention: selection, dense reference, chunked PyTorch path, memory, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from megatron_rwkvx.kernels import sparse_attention as sa
from megatron_rwkvx.kernels.sparse_attention import (
    chunk_mean_keys,
    select_chunks,
    topk_chunk_attention,
    topk_chunk_selection,
)
from megatron_rwkvx.kernels.sparse_attention import chunked


def _inputs(b, tq, hq, hkv, d, *, tk=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    tk = tq if tk is None else tk
    q = torch.randn(b, tq, hq, d, generator=g, dtype=dtype)
    k = torch.randn(b, tk, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(b, tk, hkv, d, generator=g, dtype=dtype)
    return q, k, v


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _run(backend, q, k, v, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = topk_chunk_attention(q, k, v, backend=backend, **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _assert_same(got, want, tol=1e-5):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, name
        err = _rel(a, b)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def _select_bruteforce(q, k, chunk, top_k, q_offset):
    """Per-query loop written straight from the definition (ties to the lower chunk index)."""
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    out = torch.full((b, hq, tq, top_k - 1), -1, dtype=torch.long)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for t in range(tq):
                c = (q_offset + t) // chunk
                scores = [
                    float(q[bi, t, h].double() @ k[bi, i * chunk : (i + 1) * chunk, kh].double().mean(0))
                    for i in range(c)
                ]
                order = sorted(range(c), key=lambda i: (-scores[i], i))[: top_k - 1]
                out[bi, h, t, : len(order)] = torch.tensor(order, dtype=torch.long)
    return out


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize(
    "tq,hq,hkv,chunk,top_k,q_offset",
    [(37, 2, 2, 4, 3, 0), (30, 4, 2, 5, 4, 0), (20, 3, 1, 4, 2, 13), (9, 2, 2, 4, 1, 0)],
)
def test_selection_matches_bruteforce(tq, hq, hkv, chunk, top_k, q_offset):
    q, k, _ = _inputs(2, tq, hq, hkv, 8, tk=q_offset + tq + 3)
    keys, sel = topk_chunk_selection(q, k, chunk_size=chunk, top_k=top_k, q_offset=q_offset)
    assert keys.dtype == torch.float32
    assert keys.shape == (2, (q_offset + tq - 1) // chunk, hkv, 8)
    assert sel.shape == (2, hq, tq, top_k - 1)
    assert torch.equal(sel, _select_bruteforce(q, k, chunk, top_k, q_offset))


def test_selection_ties_go_to_lower_chunk_and_slots_are_ordered():
    chunk, top_k = 4, 4
    q = torch.ones(1, 24, 1, 2)
    k = torch.ones(1, 24, 1, 2)  # every chunk mean is equal: all scores tie
    _, sel = topk_chunk_selection(q, k, chunk_size=chunk, top_k=top_k)
    assert sel[0, 0, 23].tolist() == [0, 1, 2]
    assert sel[0, 0, 9].tolist() == [0, 1, -1]  # chunk 2 scores chunks 0 and 1 only
    assert sel[0, 0, 3].tolist() == [-1, -1, -1]  # chunk 0 has no past
    # Distinct scores: slots in descending score order, later chunk wins when it scores higher.
    k2 = torch.zeros(1, 24, 1, 2)
    for i, val in enumerate([1.0, 3.0, 2.0, 5.0, 0.0, 0.0]):
        k2[0, i * chunk : (i + 1) * chunk] = val
    _, sel2 = topk_chunk_selection(q, k2, chunk_size=chunk, top_k=top_k)
    assert sel2[0, 0, 23].tolist() == [3, 1, 2]


def test_chunk_mean_keys_and_select_from_gathered_keys():
    q, k, _ = _inputs(1, 40, 4, 2, 8)
    keys = chunk_mean_keys(k, 8)
    assert torch.allclose(keys[0, 2, 1], k[0, 16:24, 1].mean(0))
    assert keys.shape == (1, 5, 2, 8)
    # Context parallelism: the second half of the queries with the (all-gathered) chunk keys.
    full = select_chunks(q, keys, chunk_size=8, top_k=3)
    part = select_chunks(q[:, 20:], keys, chunk_size=8, top_k=3, q_offset=20)
    assert torch.equal(part, full[:, :, 20:])
    with pytest.raises(ValueError, match="complete chunks"):
        chunk_mean_keys(k, 8, num_chunks=6)
    with pytest.raises(ValueError, match="chunk_keys holds 2 chunks"):
        select_chunks(q, keys[:, :2], chunk_size=8, top_k=3)


# ---------------------------------------------------------------- reference semantics


@pytest.mark.parametrize("t,chunk,top_k,hq,hkv", [(24, 8, 3, 2, 2), (19, 8, 3, 4, 2), (33, 11, 4, 3, 1)])
def test_dense_regime_equals_causal_sdpa(t, chunk, top_k, hq, hkv):
    assert t <= chunk * top_k
    q, k, v = _inputs(2, t, hq, hkv, 16)
    kx = k.repeat_interleave(hq // hkv, dim=2)
    vx = v.repeat_interleave(hq // hkv, dim=2)
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), kx.transpose(1, 2), vx.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    for backend in ("reference", "torch"):
        got = topk_chunk_attention(q, k, v, chunk_size=chunk, top_k=top_k, backend=backend)
        assert _rel(got, want) <= 1e-5, backend


def test_top_k_one_is_chunk_local_causal_attention():
    q, k, v = _inputs(1, 20, 2, 2, 8)
    chunk = 6
    pos = torch.arange(20)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] // chunk == pos[:, None] // chunk)
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    for backend in ("reference", "torch"):
        got = topk_chunk_attention(q, k, v, chunk_size=chunk, top_k=1, backend=backend)
        assert _rel(got, want) <= 1e-5, backend


def test_reference_attends_exactly_the_selected_chunks():
    # Making a value row huge shows whether its key is attended: the reference must see chunk i
    # from query t exactly when i is t's own chunk (causally) or one of t's selected chunks.
    q, k, v = _inputs(1, 24, 1, 1, 4, seed=3)
    chunk, top_k = 4, 2
    _, sel = topk_chunk_selection(q, k, chunk_size=chunk, top_k=top_k)
    for j in (1, 9, 14):
        v2 = v.clone()
        v2[0, j, 0, 0] = 1e6
        out = topk_chunk_attention(q, k, v2, chunk_size=chunk, top_k=top_k, backend="reference")
        for t in range(24):
            seen = out[0, t, 0, 0].abs().item() > 1e3
            visible = (j // chunk == t // chunk and j <= t) or (j // chunk) in sel[0, 0, t].tolist()
            assert seen == visible, (j, t)


# ---------------------------------------------------------------- chunked path == reference


@pytest.mark.parametrize(
    "b,t,hq,hkv,d,chunk,top_k",
    [
        (1, 64, 2, 2, 16, 8, 3),  # T a multiple of the chunk
        (2, 77, 4, 2, 8, 8, 2),  # T not a multiple, GQA, top_k 2
        (1, 100, 6, 2, 8, 7, 4),  # odd chunk, GQA 3:1
        (2, 50, 3, 3, 8, 16, 1),  # top_k 1
        (1, 40, 2, 1, 8, 16, 3),  # T <= chunk * top_k (dense regime)
        (1, 96, 2, 1, 32, 4, 5),  # many small chunks, multi-query attention
    ],
)
def test_torch_matches_reference(b, t, hq, hkv, d, chunk, top_k):
    q, k, v = _inputs(b, t, hq, hkv, d)
    kw = dict(chunk_size=chunk, top_k=top_k)
    _assert_same(_run("torch", q, k, v, **kw), _run("reference", q, k, v, **kw))


@pytest.mark.parametrize("q_offset,tq,extra", [(13, 30, 5), (16, 20, 0), (3, 1, 9), (40, 24, 0)])
def test_q_offset_equals_slice_of_full_result(q_offset, tq, extra):
    chunk, top_k = 8, 3
    t = q_offset + tq
    q, k, v = _inputs(2, t, 4, 2, 8, tk=t + extra, seed=1)
    full = topk_chunk_attention(q, k[:, :t], v[:, :t], chunk_size=chunk, top_k=top_k, backend="reference")
    kw = dict(chunk_size=chunk, top_k=top_k, q_offset=q_offset)
    part_q = q[:, q_offset:]
    ref = _run("reference", part_q, k, v, **kw)
    got = _run("torch", part_q, k, v, **kw)
    assert _rel(ref[0], full[:, q_offset:]) <= 1e-6
    _assert_same(got, ref)
    # Keys past the last query are ignored: no gradient reaches them.
    assert torch.count_nonzero(got[2][:, t:]) == 0 and torch.count_nonzero(got[3][:, t:]) == 0


def test_torch_path_splits_work_across_blocks_and_unfused_math(monkeypatch):
    # Tiny budgets force many batches, split pair groups and row blocks; the unfused math is what
    # a non-CPU device (the GPU fallback) runs.
    q, k, v = _inputs(2, 90, 4, 2, 8, seed=2)
    kw = dict(chunk_size=8, top_k=3)
    want = _run("reference", q, k, v, **kw)
    monkeypatch.setattr(chunked, "_BLOCK_BUDGET", 100)
    monkeypatch.setattr(chunked, "_BACKWARD_BLOCK", 50)
    monkeypatch.setattr(chunked, "_ROW_BLOCK", 3)
    _assert_same(_run("torch", q, k, v, **kw), want)
    monkeypatch.setattr(chunked, "_fused_cpu_attention", lambda x: False)
    _assert_same(_run("torch", q, k, v, **kw), want)
    _assert_same(_run("torch", q[:, 30:], k, v, q_offset=30, **kw), _run("reference", q[:, 30:], k, v, q_offset=30, **kw))


def test_auto_is_torch_on_cpu_and_is_deterministic():
    q, k, v = _inputs(1, 70, 2, 2, 8)
    a = topk_chunk_attention(q, k, v, chunk_size=8, top_k=3)
    b = topk_chunk_attention(q, k, v, chunk_size=8, top_k=3, backend="torch")
    assert torch.equal(a, b)


def test_precomputed_selection_and_low_precision_inputs():
    q, k, v = _inputs(1, 48, 2, 2, 16)
    _, sel = topk_chunk_selection(q, k, chunk_size=8, top_k=3)
    from megatron_rwkvx.kernels.sparse_attention.chunked import topk_chunk_attention_torch

    base = topk_chunk_attention(q, k, v, chunk_size=8, top_k=3, backend="torch")
    again = topk_chunk_attention_torch(q, k, v, chunk_size=8, top_k=3, scale=0.25, q_offset=0, selected=sel)
    assert torch.equal(base, again)
    with pytest.raises(ValueError, match="selected must be an int64 tensor"):
        topk_chunk_attention_torch(q, k, v, chunk_size=8, top_k=4, scale=0.25, q_offset=0, selected=sel)
    with pytest.raises(ValueError, match="outside"):
        topk_chunk_attention_torch(q, k, v, chunk_size=8, top_k=3, scale=0.25, q_offset=0, selected=sel + 1)
    qb, kb, vb = (t.bfloat16().requires_grad_(True) for t in (q, k, v))
    out = topk_chunk_attention(qb, kb, vb, chunk_size=8, top_k=3, backend="torch")
    assert out.dtype == torch.bfloat16
    want = topk_chunk_attention(qb.float(), kb.float(), vb.float(), chunk_size=8, top_k=3, backend="reference")
    assert _rel(out.float(), want) < 2e-2
    out.float().sum().backward()
    assert qb.grad.dtype == torch.bfloat16 and kb.grad.dtype == torch.bfloat16


def test_custom_scale():
    q, k, v = _inputs(1, 40, 2, 2, 8)
    kw = dict(chunk_size=8, top_k=2, scale=0.7)
    _assert_same(_run("torch", q, k, v, **kw), _run("reference", q, k, v, **kw))
    a = topk_chunk_attention(q, k, v, **kw)
    assert _rel(a, topk_chunk_attention(q, k, v, chunk_size=8, top_k=2)) > 1e-3
    # The scale enters the softmax only, never the (unscaled) selection: scaling q by 3 and the
    # softmax scale by 1/3 changes nothing.
    c = topk_chunk_attention(q * 3.0, k, v, chunk_size=8, top_k=2, scale=0.7 / 3.0)
    assert _rel(c, a) <= 1e-5


# ---------------------------------------------------------------- memory

_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from megatron_rwkvx.kernels.sparse_attention import topk_chunk_attention
    # One thread: memory does not depend on it, and the run stays quick on a busy machine.
    torch.set_num_threads(1)
    backend, t, chunk, heads, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    def status_mib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    def step():
        topk_chunk_attention(q, k, v, chunk_size=chunk, top_k=3, backend=backend).sum().backward()
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(1, t, heads, d, generator=g).requires_grad_(True) for _ in range(3)]
    step()  # warm-up: thread pools and kernel caches are not part of the measurement
    q.grad = k.grad = v.grad = None
    before = status_mib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark VmHWM to VmRSS
    step()
    print(json.dumps({"peak_mib": status_mib("VmHWM") - before}))
    """
)


def _peak_mib(backend, t, chunk, heads=1, d=16):
    """Peak resident-set growth over one forward+backward, measured in a fresh process."""
    # Large blocks always come from (and go back to) mmap, so freed heap cannot hide allocations.
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run(
        [sys.executable, "-c", _PROBE, backend, str(t), str(chunk), str(heads), str(d)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_at_16k_stays_far_below_a_dense_score_matrix():
    # The probe must see a T x T tensor: the dense reference at T=4096 holds several 64 MiB
    # [T, T] fp32 buffers (scores, probabilities, their gradients).
    dense = _peak_mib("reference", 4096, 256)
    assert dense > 128, f"probe does not see the dense reference's score matrices ({dense:.0f} MiB)"
    # One head at T = 16K: a dense fp32 score matrix alone would be 1024 MiB.
    sparse = _peak_mib("torch", 16384, 256, heads=2)
    assert sparse < 128, f"chunked path peaked at {sparse:.0f} MiB at T=16K (dense scores: 1024 MiB/head)"


# ---------------------------------------------------------------- errors


def test_clear_errors():
    q, k, v = _inputs(1, 16, 4, 2, 8)
    call = lambda *a, **kw: topk_chunk_attention(*a, **{"chunk_size": 4, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="sparse-attention: unknown backend 'nope'"):
        call(q, k, v, backend="nope")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        call(q, *_inputs(1, 16, 3, 3, 8)[1:])
    with pytest.raises(ValueError, match="head_dim differs"):
        call(q, *_inputs(1, 16, 2, 2, 4)[1:])
    with pytest.raises(ValueError, match=r"Tk >= q_offset \+ Tq"):
        call(q, k[:, :10], v[:, :10])
    with pytest.raises(ValueError, match=r"Tk >= q_offset \+ Tq"):
        call(q, k, v, q_offset=1)
    with pytest.raises(ValueError, match="4 dims"):
        call(q[0], k, v)
    with pytest.raises(ValueError, match="same shape"):
        call(q, k, v[:, :8])
    with pytest.raises(ValueError, match="batch sizes differ"):
        call(q, torch.cat([k, k]), torch.cat([v, v]))
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        call(q, k, v, top_k=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        call(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="q_offset must be an int >= 0"):
        call(q, k, v, q_offset=-1)
    with pytest.raises(ValueError, match="scale must be a positive finite"):
        call(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="floating-point"):
        call(q.long(), k, v)


def test_unavailable_backend_and_triton_lookup(monkeypatch):
    q, k, v = _inputs(1, 16, 2, 2, 8)
    monkeypatch.setattr(sa.SPARSE_ATTENTION, "_backends", dict(sa.SPARSE_ATTENTION._backends))
    sa.register_backend("gpu_only", lambda *a, **kw: None, lambda x: x.is_cuda)
    with pytest.raises(RuntimeError, match="backend 'gpu_only' cannot run on device cpu"):
        topk_chunk_attention(q, k, v, chunk_size=4, backend="gpu_only")
    # A Triton kernel cannot run on CPU tensors: either it is not registered (yet) or it refuses.
    with pytest.raises((ValueError, RuntimeError), match="triton"):
        topk_chunk_attention(q, k, v, chunk_size=4, backend="triton")
    assert {"reference", "torch"} <= set(sa.available_backends(q))
