"""Section 1: Triton sparse attention and Triton WKV-7 against fp32 references computed on the
same device from the same rounded inputs (outputs and every gradient, as rms(err)/rms(ref), and
the max relative error for fp32 runs); the Triton selection against the PyTorch selection; sparse
attention against SDPA where it must equal dense causal attention (T <= chunk * top_k)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_rwkvx.kernels.registry import HALF_TOLERANCE, rms_ratio
from megatron_rwkvx.kernels.sparse_attention import (
    MEAN_SELECTION,
    QUEST_SELECTION,
    chunk_selection_keys,
    select_chunks,
    selection_queries,
    topk_chunk_attention,
)
from megatron_rwkvx.kernels.wkv7 import wkv7

from .bench import Bench, max_rel


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _sparse_run(backend, q, k, v, grad, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = topk_chunk_attention(q, k, v, backend=backend, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    return out.detach(), dq, dk, dv


def check_sparse(bench: Bench, name, B, Tq, Tk, Hq, Hkv, D, chunk, top_k, q_offset, dtype, tol,
                 selection=MEAN_SELECTION):
    # Imported here: the Triton selection kernels exist only where triton imports.
    from megatron_rwkvx.kernels.sparse_attention.triton_select import select_chunks_triton

    kw = dict(chunk_size=chunk, top_k=top_k, q_offset=q_offset, selection=selection)
    q = bench.randn(B, Tq, Hq, D, seed=1).to(dtype)
    k = bench.randn(B, Tk, Hkv, D, seed=2).to(dtype)
    v = bench.randn(B, Tk, Hkv, D, seed=3).to(dtype)
    grad = bench.randn(B, Tq, Hq, D, seed=4).to(dtype).float()
    got = _sparse_run("triton", q, k, v, grad, **kw)
    # fp32 reference (the dense definition) on the same rounded inputs.
    ref = _sparse_run("reference", q.float(), k.float(), v.float(), grad, **kw)
    res = {"check": name, "dtype": _dtype_name(dtype), "shape": [B, Tq, Tk, Hq, Hkv, D],
           "chunk": chunk, "top_k": top_k, "q_offset": q_offset, "selection": selection}
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        res[f"{label}_rms"] = rms_ratio(a, b)
        if dtype == torch.float32:
            res[f"{label}_maxrel"] = max_rel(a, b)
    n = (q_offset + Tq - 1) // chunk
    if top_k > 1 and n > 0:
        keys, queries = chunk_selection_keys(k, chunk, n, selection), selection_queries(q, selection)
        want = select_chunks(queries, keys, chunk_size=chunk, top_k=top_k, q_offset=q_offset)
        have = select_chunks_triton(queries, keys, chunk_size=chunk, top_k=top_k, q_offset=q_offset).long()
        res["selection_match"] = (have == want).all(dim=-1).float().mean().item()
    worst = max(res[f"{x}_rms"] for x in ("out", "dq", "dk", "dv"))
    res["worst_rms"] = worst
    res["tolerance"] = tol
    res["passed"] = worst < tol and res.get("selection_match", 1.0) >= 0.999
    return res


def check_sparse_equals_dense(bench: Bench, T, H, D, chunk, top_k, dtype, tol):
    """T <= chunk * top_k: every query sees all past keys, so this is dense causal attention."""
    q, k, v = (bench.randn(1, T, H, D, seed=10 + i).to(dtype) for i in range(3))
    ours = topk_chunk_attention(q, k, v, chunk_size=chunk, top_k=top_k, backend="triton")
    dense = F.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), is_causal=True
    ).transpose(1, 2)
    err = rms_ratio(ours, dense)
    return {"check": "sparse_equals_dense_causal", "dtype": _dtype_name(dtype),
            "shape": [1, T, H, D], "chunk": chunk, "top_k": top_k, "out_rms": err,
            "worst_rms": err, "tolerance": tol, "passed": err < tol}


def _wkv_run(backend, xs, state, dy, dstate):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    s0 = state.detach().clone().requires_grad_(True)
    y, final = wkv7(*xs, s0, backend=backend)
    grads = torch.autograd.grad((y, final), xs + [s0], (dy.to(y.dtype), dstate))
    return [y.detach(), final.detach()] + list(grads)


def check_wkv(bench: Bench, name, B, T, H, N, dtype, tol, reference="torch"):
    xs = bench.wkv_inputs(B, T, H, N, dtype, seed=20)
    state = bench.randn(B, H, N, N, seed=30, scale=0.3)
    dy = bench.randn(B, T, H, N, seed=31).to(dtype).float()
    dstate = bench.randn(B, H, N, N, seed=32)
    got = _wkv_run("triton", xs, state, dy, dstate)
    ref = _wkv_run(reference, [x.float() for x in xs], state, dy, dstate)
    labels = ("y", "final_state", "dr", "dw", "dk", "dv", "da", "db", "d_state0")
    res = {"check": name, "dtype": _dtype_name(dtype), "shape": [B, T, H, N], "reference": reference}
    for label, a, b in zip(labels, got, ref):
        res[f"{label}_rms"] = rms_ratio(a, b)
        if dtype == torch.float32:
            res[f"{label}_maxrel"] = max_rel(a, b)
    worst = max(res[f"{x}_rms"] for x in labels)
    res["worst_rms"] = worst
    res["tolerance"] = tol
    res["passed"] = worst < tol
    return res


def correctness_checks(bench: Bench):
    """(name, thunk) list; each thunk returns a result dict."""
    low_tol = HALF_TOLERANCE  # bf16 inputs and outputs: ~3 bf16 ulps of rms error
    checks = []
    if bench.smoke:
        f32 = torch.float32
        checks.append(("sparse_fp32_gqa", lambda: check_sparse(
            bench, "sparse_fp32_gqa", 1, 40, 40, 2, 1, 16, 16, 3, 0, f32, 1e-5)))
        checks.append(("wkv7_fp32", lambda: check_wkv(bench, "wkv7_fp32", 1, 20, 1, 16, f32, 1e-5, "reference")))
        return checks
    bf = torch.bfloat16
    checks.append(("sparse_bf16_d64", lambda: check_sparse(
        bench, "sparse_bf16_d64", 1, 2048 + 77, 2048 + 77, 8, 8, 64, 256, 3, 0, bf, low_tol)))
    checks.append(("sparse_bf16_d128_gqa_offset", lambda: check_sparse(
        bench, "sparse_bf16_d128_gqa_offset", 2, 900, 1900, 8, 2, 128, 128, 4, 700, bf, low_tol)))
    checks.append(("sparse_fp32_d64", lambda: check_sparse(
        bench, "sparse_fp32_d64", 1, 1000, 1000, 4, 2, 64, 128, 3, 0, torch.float32, 1e-4)))
    checks.append(("sparse_bf16_d64_quest", lambda: check_sparse(
        bench, "sparse_bf16_d64_quest", 1, 2048 + 77, 2048 + 77, 8, 2, 64, 256, 3, 0, bf, low_tol, QUEST_SELECTION)))
    checks.append(("sparse_equals_dense", lambda: check_sparse_equals_dense(
        bench, 4096, 8, 64, 2048, 3, bf, low_tol)))
    checks.append(("wkv7_bf16_n64", lambda: check_wkv(bench, "wkv7_bf16_n64", 2, 500, 4, 64, bf, low_tol)))
    if not bench.quick:
        checks.append(("wkv7_bf16_n128", lambda: check_wkv(bench, "wkv7_bf16_n128", 1, 300, 2, 128, bf, low_tol)))
        checks.append(("wkv7_fp32_n64", lambda: check_wkv(
            bench, "wkv7_fp32_n64", 1, 200, 2, 64, torch.float32, 1e-4)))
    return checks
