"""One prepared GPU check of the Triton kernels: correctness in bf16, then forward+backward timings.

Written for a GPU lent for a few minutes (H100/H200): it must finish in under 8 minutes, so every
timing case checks a time budget before it starts, and each check and case is guarded so that
one failure (an error, an out-of-memory) is recorded and the rest still run. It prints a short
table last and writes every number to ``--out`` (JSON). Exit status 1 when a correctness check
failed or raised, else 0.

It imports only ``megatron_rwkvx.kernels`` (never megatron-core): run it from the repository root
as ``PYTHONPATH=<site>:. python tools/gpu_check.py --out results.json``; a shim maps
``megatron_rwkvx.kernels`` to this checkout's ``kernels/`` without running
``megatron_rwkvx/__init__.py``.

    python tools/gpu_check.py --out gpu.json            # everything below (< 8 min on an H200)
    python tools/gpu_check.py --quick --out gpu.json    # T = 4K, 16K, smaller checks (~3 min)
    python tools/gpu_check.py --cpu-smoke --out s.json  # tiny, CPU, Triton interpreter (tests)

Sections:
1. correctness: Triton sparse attention and Triton WKV-7 in bf16 (fp32 in --cpu-smoke: the
   interpreter's bf16 dot is broken) against fp32 references computed on the same device from the
   same rounded inputs; outputs and every gradient, as rms(err)/rms(ref) (and max relative error
   for the fp32 runs); the sparse selection against the shared PyTorch selection; sparse attention
   against SDPA where it must equal dense causal attention (T <= chunk * top_k).
2. timing (CUDA events, warm-up, median): WKV-7 Triton vs fla ``chunk_rwkv7`` (when fla imports);
   sparse attention Triton (chunk 2048, top-k 3) vs SDPA causal (flash backend); one RWKV-X layer
   pair (an RWKV-7 block + a sparse-attention block, plain torch layers around the two ops) vs one
   dense attention block of the same width. B=1, 32 heads of 64 (width 2048), bf16.
3. kernel breakdown (``--no-profile`` skips it): WKV-7 ours, WKV-7 fla and our sparse attention at
   one length (``--profile-length``, default 64K): forward alone vs forward+backward, and one
   forward+backward under ``torch.profiler`` (CUDA activity): each GPU kernel's calls and total
   ms, and the step's wall time (CUDA events) minus the time the GPU was busy in kernels (gaps:
   host syncs, launch overhead).
4. WKV-7 variant sweep (``--no-variants`` skips it): ``wkv7_triton`` with chunk_size 16/32/64 and
   pair_mode exact/factored at ``--variant-lengths`` (default 16K, 128K), fwd+bwd ms against the
   default call and fla, and y against the default call's y (rms ratio < 2e-2).
5. sparse-attention variant sweep (``--no-sparse-variants`` skips it): autotuned blocks (the
   default), a 128-pair tile, and the fixed first-guess blocks (``RWKVX_TRITON_AUTOTUNE=0``) at
   ``--sparse-variant-lengths`` (default 128K). The JSON also lists every autotuner's choices.

Order, most valuable first, every timing case gated by one time budget (``--budget-s``):
correctness; the main table at 16K and 128K; the breakdown; the WKV-7 variants; the sparse
variants; the main table's other lengths (4K, 64K).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START = time.time()


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="T = 4K and 16K only, smaller checks")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny run on the CPU through Triton's interpreter")
    p.add_argument("--out", type=str, default=None, help="write the results as JSON to this path")
    p.add_argument("--lengths", type=str, default=None, help="comma-separated T list (overrides the default)")
    p.add_argument(
        "--budget-s", type=float, default=None,
        help="no timing case starts after this many seconds (default 400, --quick 200)",
    )
    p.add_argument("--skip-timing", action="store_true", help="correctness checks only")
    p.add_argument("--profile-length", type=int, default=None,
                   help="T of the kernel breakdown (default 65536; 64 with --cpu-smoke)")
    p.add_argument("--no-profile", action="store_true", help="skip the kernel breakdown")
    p.add_argument("--variant-lengths", type=str, default=None,
                   help="comma-separated T list of the WKV-7 variant sweep (default 16384,131072)")
    p.add_argument("--no-variants", action="store_true", help="skip the WKV-7 variant sweep")
    p.add_argument("--sparse-variant-lengths", type=str, default=None,
                   help="comma-separated T list of the sparse-attention variant sweep (default 131072)")
    p.add_argument("--no-sparse-variants", action="store_true", help="skip the sparse-attention variant sweep")
    return p.parse_args(argv)


ARGS = _parse_args()
if ARGS.cpu_smoke:
    # Must precede the first import of triton: triton.jit reads it when kernels are defined.
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _install_kernels_shim() -> None:
    """Map ``megatron_rwkvx.kernels`` to ``<repo>/kernels`` without importing megatron_rwkvx."""
    if "megatron_rwkvx.kernels" in sys.modules:
        return
    parent = sys.modules.get("megatron_rwkvx")
    if parent is None:
        parent = types.ModuleType("megatron_rwkvx")
        parent.__path__ = [str(REPO / "megatron_rwkvx")]
        parent.__package__ = "megatron_rwkvx"
        sys.modules["megatron_rwkvx"] = parent
    spec = importlib.util.spec_from_file_location(
        "megatron_rwkvx.kernels", REPO / "kernels" / "__init__.py",
        submodule_search_locations=[str(REPO / "kernels")],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["megatron_rwkvx.kernels"] = module
    spec.loader.exec_module(module)
    parent.kernels = module


_install_kernels_shim()

from megatron_rwkvx.kernels.sparse_attention import (  # noqa: E402
    available_backends as sparse_backends,
    chunk_mean_keys,
    select_chunks,
    topk_chunk_attention,
)
from megatron_rwkvx.kernels.wkv7 import available_backends as wkv_backends  # noqa: E402
from megatron_rwkvx.kernels.wkv7 import wkv7  # noqa: E402

SMOKE = ARGS.cpu_smoke
DEVICE = torch.device("cpu" if SMOKE else "cuda")
# bf16 is the training dtype; the interpreter can only run fp32/fp16 dots.
DTYPE = torch.float32 if SMOKE else torch.bfloat16
LOG_DECAY_MIN = -math.exp(-0.5)  # RWKV-7's log decay lies in [-exp(-0.5), 0)


def _elapsed() -> float:
    return time.time() - START


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _rms_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


def _free():
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# inputs


class Unavailable(Exception):
    """A comparison that cannot run here (e.g. fla not installed): reported, not an error."""


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=_gen(seed), device=DEVICE) * scale


def wkv_inputs(B, T, H, N, dtype, seed=0):
    """Model-like WKV inputs: log decay in [-exp(-0.5), 0), a = -kk, b = kk * rate, |kk| = 1."""
    r, k, v = (_randn(B, T, H, N, seed=seed + i, scale=0.5) for i in range(3))
    w = LOG_DECAY_MIN * torch.sigmoid(_randn(B, T, H, N, seed=seed + 3))
    kk = F.normalize(_randn(B, T, H, N, seed=seed + 4), dim=-1)
    rate = torch.sigmoid(_randn(B, T, H, N, seed=seed + 5))
    return [t.to(dtype) for t in (r, w, k, v, -kk, kk * rate)]


# ---------------------------------------------------------------------------------------------
# 1. correctness


def _sparse_run(backend, q, k, v, grad, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = topk_chunk_attention(q, k, v, backend=backend, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    return out.detach(), dq, dk, dv


def check_sparse(name, B, Tq, Tk, Hq, Hkv, D, chunk, top_k, q_offset, dtype, tol):
    kw = dict(chunk_size=chunk, top_k=top_k, q_offset=q_offset)
    q = _randn(B, Tq, Hq, D, seed=1).to(dtype)
    k = _randn(B, Tk, Hkv, D, seed=2).to(dtype)
    v = _randn(B, Tk, Hkv, D, seed=3).to(dtype)
    grad = _randn(B, Tq, Hq, D, seed=4).to(dtype).float()
    got = _sparse_run("triton", q, k, v, grad, **kw)
    # fp32 reference (the dense definition) on the same rounded inputs.
    ref = _sparse_run("reference", q.float(), k.float(), v.float(), grad, **kw)
    res = {"check": name, "dtype": str(dtype).replace("torch.", ""), "shape": [B, Tq, Tk, Hq, Hkv, D],
           "chunk": chunk, "top_k": top_k, "q_offset": q_offset}
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        res[f"{label}_rms"] = _rms_ratio(a, b)
        if dtype == torch.float32:
            res[f"{label}_maxrel"] = _max_rel(a, b)
    n = (q_offset + Tq - 1) // chunk
    if top_k > 1 and n > 0:
        from megatron_rwkvx.kernels.sparse_attention.triton_select import select_chunks_triton

        keys = chunk_mean_keys(k, chunk, n)
        want = select_chunks(q, keys, chunk_size=chunk, top_k=top_k, q_offset=q_offset)
        have = select_chunks_triton(q, keys, chunk_size=chunk, top_k=top_k, q_offset=q_offset).long()
        res["selection_match"] = (have == want).all(dim=-1).float().mean().item()
    worst = max(res[f"{x}_rms"] for x in ("out", "dq", "dk", "dv"))
    res["worst_rms"] = worst
    res["tolerance"] = tol
    res["passed"] = worst < tol and res.get("selection_match", 1.0) >= 0.999
    return res


def check_sparse_equals_dense(T, H, D, chunk, top_k, dtype, tol):
    """T <= chunk * top_k: every query sees all past keys, so this is dense causal attention."""
    q, k, v = (_randn(1, T, H, D, seed=10 + i).to(dtype) for i in range(3))
    ours = topk_chunk_attention(q, k, v, chunk_size=chunk, top_k=top_k, backend="triton")
    dense = F.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), is_causal=True
    ).transpose(1, 2)
    err = _rms_ratio(ours, dense)
    return {"check": "sparse_equals_dense_causal", "dtype": str(dtype).replace("torch.", ""),
            "shape": [1, T, H, D], "chunk": chunk, "top_k": top_k, "out_rms": err,
            "worst_rms": err, "tolerance": tol, "passed": err < tol}


def _wkv_run(backend, xs, state, dy, dstate):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    s0 = state.detach().clone().requires_grad_(True)
    y, final = wkv7(*xs, s0, backend=backend)
    grads = torch.autograd.grad((y, final), xs + [s0], (dy.to(y.dtype), dstate))
    return [y.detach(), final.detach()] + list(grads)


def check_wkv(name, B, T, H, N, dtype, tol, reference="chunked"):
    xs = wkv_inputs(B, T, H, N, dtype, seed=20)
    state = _randn(B, H, N, N, seed=30, scale=0.3)
    dy = _randn(B, T, H, N, seed=31).to(dtype).float()
    dstate = _randn(B, H, N, N, seed=32)
    got = _wkv_run("triton", xs, state, dy, dstate)
    ref = _wkv_run(reference, [x.float() for x in xs], state, dy, dstate)
    labels = ("y", "final_state", "dr", "dw", "dk", "dv", "da", "db", "d_state0")
    res = {"check": name, "dtype": str(dtype).replace("torch.", ""), "shape": [B, T, H, N],
           "reference": reference}
    for label, a, b in zip(labels, got, ref):
        res[f"{label}_rms"] = _rms_ratio(a, b) if torch.isfinite(a).all() else float("inf")
        if dtype == torch.float32:
            res[f"{label}_maxrel"] = _max_rel(a, b)
    worst = max(res[f"{x}_rms"] for x in labels)
    res["worst_rms"] = worst
    res["tolerance"] = tol
    res["passed"] = worst < tol
    return res


def correctness_checks():
    """(name, thunk) list; each thunk returns a result dict."""
    low_tol = 2e-2  # bf16 inputs and outputs: ~3 bf16 ulps of rms error
    checks = []
    if SMOKE:
        f32 = torch.float32
        checks.append(("sparse_fp32_gqa", lambda: check_sparse(
            "sparse_fp32_gqa", 1, 40, 40, 2, 1, 16, 16, 3, 0, f32, 1e-5)))
        checks.append(("wkv7_fp32", lambda: check_wkv("wkv7_fp32", 1, 20, 1, 16, f32, 1e-5, "naive")))
        return checks
    bf = torch.bfloat16
    checks.append(("sparse_bf16_d64", lambda: check_sparse(
        "sparse_bf16_d64", 1, 2048 + 77, 2048 + 77, 8, 8, 64, 256, 3, 0, bf, low_tol)))
    checks.append(("sparse_bf16_d128_gqa_offset", lambda: check_sparse(
        "sparse_bf16_d128_gqa_offset", 2, 900, 1900, 8, 2, 128, 128, 4, 700, bf, low_tol)))
    checks.append(("sparse_fp32_d64", lambda: check_sparse(
        "sparse_fp32_d64", 1, 1000, 1000, 4, 2, 64, 128, 3, 0, torch.float32, 1e-4)))
    checks.append(("sparse_equals_dense", lambda: check_sparse_equals_dense(4096, 8, 64, 2048, 3, bf, low_tol)))
    checks.append(("wkv7_bf16_n64", lambda: check_wkv("wkv7_bf16_n64", 2, 500, 4, 64, bf, low_tol)))
    if not ARGS.quick:
        checks.append(("wkv7_bf16_n128", lambda: check_wkv("wkv7_bf16_n128", 1, 300, 2, 128, bf, low_tol)))
        checks.append(("wkv7_fp32_n64", lambda: check_wkv("wkv7_fp32_n64", 1, 200, 2, 64, torch.float32, 1e-4)))
    return checks


# ---------------------------------------------------------------------------------------------
# 2. timing


def time_fwd_bwd(step, warmup, reps):
    """Median milliseconds of ``step()`` (one forward+backward) after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    _sync()
    times = []
    for _ in range(reps):
        if DEVICE.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _grad_step(fn, inputs, params=()):
    """A closure running fn(*inputs) forward and backward into ``inputs`` and ``params``;
    ``step.forward()`` runs the forward pass alone (autograd recording on, output dropped)."""
    leaves = list(inputs) + list(params)

    def step():
        out = fn(*inputs)
        if isinstance(out, tuple):
            out = out[0]
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    def forward():
        fn(*inputs)

    step.forward = forward
    return step


def fla_chunk_rwkv7():
    """(callable(r, w, k, v, a, b) or None, note)."""
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except Exception as exc:  # not installed, or broken
        return None, f"fla not importable: {type(exc).__name__}: {exc}"
    import inspect

    params = inspect.signature(chunk_rwkv7).parameters
    # Releases differ: older ones take the log decay as ``w``; newer ones take ``w`` with
    # log decay -exp(w) and the log decay itself as ``log_w``.
    decay_kw = "log_w" if "log_w" in params else "w"
    extra = {n: v for n, v in (("scale", 1.0), ("output_final_state", True)) if n in params}

    def call(r, w, k, v, a, b):
        return chunk_rwkv7(r=r, k=k, v=v, a=a, b=b, **{decay_kw: w}, **extra)

    version = getattr(sys.modules.get("fla"), "__version__", "?")
    return call, f"fla {version} chunk_rwkv7 (decay passed as {decay_kw}=log decay)"


# -- layers built from plain torch modules around the two operators --


class ChannelMix(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.mu = nn.Parameter(torch.full((c,), 0.5))
        self.key = nn.Linear(c, 4 * c, bias=False)
        self.value = nn.Linear(4 * c, c, bias=False)

    def forward(self, x):
        h = self.ln(x)
        xx = F.pad(h, (0, 0, 1, -1)) - h
        return x + self.value(torch.relu(self.key(h + xx * self.mu)).square())


class RWKV7TimeMix(nn.Module):
    """RWKV-7 time mixing (token shift, r/k/v/o, LoRA decay, in-context rate and gate, GroupNorm)."""

    def __init__(self, c, head_size, backend, lora=64, gate_lora=128):
        super().__init__()
        self.h, self.n, self.backend = c // head_size, head_size, backend
        self.ln = nn.LayerNorm(c)
        self.mu = nn.Parameter(torch.full((6, c), 0.5))
        self.r, self.k, self.v, self.o = (nn.Linear(c, c, bias=False) for _ in range(4))
        self.w1, self.w2 = nn.Linear(c, lora, bias=False), nn.Linear(lora, c)
        self.a1, self.a2 = nn.Linear(c, lora, bias=False), nn.Linear(lora, c)
        self.g1, self.g2 = nn.Linear(c, gate_lora, bias=False), nn.Linear(gate_lora, c, bias=False)
        self.k_k = nn.Parameter(torch.full((c,), 0.85))
        self.k_a = nn.Parameter(torch.ones(c))
        self.r_k = nn.Parameter(torch.zeros(self.h, head_size))
        self.ln_x = nn.GroupNorm(self.h, c, eps=64e-5)

    def forward(self, x):
        B, T, C = x.shape
        H, N = self.h, self.n
        h = self.ln(x)
        xx = F.pad(h, (0, 0, 1, -1)) - h
        xr, xw, xk, xv, xa, xg = (h + xx * self.mu[i] for i in range(6))
        r, k, v = self.r(xr), self.k(xk), self.v(xv)
        log_w = LOG_DECAY_MIN * torch.sigmoid(self.w2(torch.tanh(self.w1(xw))))
        a = torch.sigmoid(self.a2(self.a1(xa)))
        g = self.g2(torch.sigmoid(self.g1(xg)))
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1)
        k = k * (1 + (a - 1) * self.k_a)
        shape = (B, T, H, N)
        y, _ = wkv7(r.view(shape), log_w.view(shape), k.view(shape), v.view(shape), -kk,
                    kk * a.view(shape), backend=self.backend)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (r.view(shape) * k.view(shape) * self.r_k).sum(-1, keepdim=True) * v.view(shape)
        return x + self.o((y + bonus.reshape(B, T, C)) * g)


class Attention(nn.Module):
    """Bias-free q/k/v/o projections, no positional encoding (as RWKV-X's sparse block)."""

    def __init__(self, c, head_size, sparse_backend=None, chunk=2048, top_k=3):
        super().__init__()
        self.h, self.d = c // head_size, head_size
        self.sparse_backend, self.chunk, self.top_k = sparse_backend, chunk, top_k
        self.ln = nn.LayerNorm(c)
        self.q, self.k, self.v, self.o = (nn.Linear(c, c, bias=False) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        h = self.ln(x)
        q, k, v = (p(h).view(B, T, self.h, self.d) for p in (self.q, self.k, self.v))
        if self.sparse_backend is not None:
            y = topk_chunk_attention(q, k, v, chunk_size=self.chunk, top_k=self.top_k,
                                     backend=self.sparse_backend)
        else:
            y = sdpa_causal(q, k, v)
        return x + self.o(y.reshape(B, T, C))


def sdpa_causal(q, k, v):
    """Dense causal attention on [B, T, H, D] through SDPA's flash backend (any backend on the CPU)."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if DEVICE.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    return out.transpose(1, 2)


def timing_plan(lengths, cfg):
    """[(T, case name, build)] where build() returns (step, note)."""
    H, D, chunk, top_k = cfg["heads"], cfg["head_size"], cfg["chunk"], cfg["top_k"]
    C = H * D
    wkv_ours = cfg["wkv_backend"]
    sparse_ours = cfg["sparse_backend"]
    fla_call, fla_note = fla_chunk_rwkv7() if DEVICE.type == "cuda" else (None, "fla needs CUDA: skipped")

    def wkv_case(T, use_fla):
        def build():
            xs = [t.requires_grad_(True) for t in wkv_inputs(1, T, H, D, DTYPE, seed=T)]
            if use_fla:
                if fla_call is None:
                    raise Unavailable(fla_note)
                return _grad_step(fla_call, xs), fla_note
            return _grad_step(lambda *a: wkv7(*a, backend=wkv_ours), xs), f"wkv7 backend={wkv_ours}"
        return build

    def attn_case(T, sparse):
        def build():
            q, k, v = (_randn(1, T, H, D, seed=T + i).to(DTYPE).requires_grad_(True) for i in range(3))
            if sparse:
                fn = lambda q, k, v: topk_chunk_attention(  # noqa: E731
                    q, k, v, chunk_size=chunk, top_k=top_k, backend=sparse_ours)
                return _grad_step(fn, (q, k, v)), f"backend={sparse_ours} chunk={chunk} top_k={top_k}"
            return _grad_step(sdpa_causal, (q, k, v)), "SDPA is_causal, flash backend" if DEVICE.type == "cuda" else "SDPA (CPU)"
        return build

    def layer_case(T, kind):
        def build():
            torch.manual_seed(0)
            if kind == "rwkv":
                block = nn.Sequential(RWKV7TimeMix(C, D, wkv_ours), ChannelMix(C))
            elif kind == "sparse":
                block = nn.Sequential(Attention(C, D, sparse_ours, chunk, top_k), ChannelMix(C))
            else:
                block = nn.Sequential(Attention(C, D, None), ChannelMix(C))
            block = block.to(device=DEVICE, dtype=DTYPE)
            x = (_randn(1, T, C, seed=T) * 0.5).to(DTYPE).requires_grad_(True)
            return _grad_step(block, (x,), [p for p in block.parameters()]), f"block width {C}"
        return build

    plan = []
    for T in lengths:
        plan += [
            (T, "wkv7_ours", wkv_case(T, False)),
            (T, "wkv7_fla", wkv_case(T, True)),
            (T, "sparse_ours", attn_case(T, True)),
            (T, "sdpa_dense", attn_case(T, False)),
            (T, "block_rwkv7", layer_case(T, "rwkv")),
            (T, "block_sparse", layer_case(T, "sparse")),
            (T, "block_dense", layer_case(T, "dense")),
        ]
    return plan


def run_timing(lengths, cfg, budget_s):
    rows = []
    for T, name, build in timing_plan(lengths, cfg):
        row = {"T": T, "case": name}
        if _elapsed() > budget_s:
            row["status"] = f"skipped: time budget ({budget_s:.0f} s) spent"
            rows.append(row)
            continue
        reps = cfg["reps"] if T <= 16384 else max(1, cfg["reps"] - 2)
        t0 = time.time()
        try:
            if DEVICE.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            step, note = build()
            row["note"] = note
            row["ms"] = time_fwd_bwd(step, cfg["warmup"], reps)
            row["reps"] = reps
            row["status"] = "ok"
            if DEVICE.type == "cuda":
                row["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        except Unavailable as exc:
            row["status"] = f"unavailable: {exc}"
        except Exception as exc:  # OOM or a broken case: record it, go on
            row["status"] = "OOM" if _is_oom(exc) else f"error: {type(exc).__name__}: {str(exc)[:300]}"
            if not _is_oom(exc):
                row["traceback"] = traceback.format_exc()[-2000:]
        finally:
            step = None  # noqa: F841  (drops the inputs and graph before the next case)
            _free()
        row["case_s"] = round(time.time() - t0, 1)  # wall time, compile and autotune included
        row["elapsed_s"] = round(_elapsed(), 1)
        took = f" {row['ms']:.2f} ms" if "ms" in row else ""
        print(f"[{_elapsed():6.1f}s] T={T:>6} {name:13s} {row['status']}{took} ({row['case_s']} s)", flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# 3. kernel breakdown


BREAKDOWN_CASES = ("wkv7_ours", "wkv7_fla", "sparse_ours")


def _error_status(exc: BaseException) -> str:
    return "OOM" if _is_oom(exc) else f"error: {type(exc).__name__}: {str(exc)[:300]}"


def _skipped(budget_s: float) -> str:
    return f"skipped: time budget ({budget_s:.0f} s) spent"


def _short_name(name: str, width: int = 56) -> str:
    """A GPU kernel's name without ``void``, namespaces and its argument list, at most ``width``."""
    n = name.strip()
    if n.startswith("void "):
        n = n[5:]
    n = n.replace("(anonymous namespace)::", "")
    n = re.sub(r"\b[A-Za-z_]\w*::", "", n)
    n = n.split("(", 1)[0].strip() or name.strip()
    return n if len(n) <= width else n[: width - 2] + ".."


def profile_step(step, top: int = 15) -> dict:
    """One ``step()`` under ``torch.profiler``: per kernel (shortened name) the calls and total ms,
    and the step's wall time minus the time the GPU was busy in kernels (gaps). On the CPU
    (interpreter) it records CPU activity: torch ops with their self time (the interpreted Triton
    kernels' time lands in their autograd functions' self time)."""
    from torch.profiler import ProfilerActivity

    if DEVICE.type != "cuda":
        return _profile_once(step, [ProfilerActivity.CPU], top)
    try:
        return _profile_once(step, [ProfilerActivity.CUDA], top)
    except _NoEvents as exc:  # some builds list kernels only with CPU activity on as well
        out = _profile_once(step, [ProfilerActivity.CPU, ProfilerActivity.CUDA], top)
        out["note"] = f"CUDA activity alone: {exc}; retried with CPU+CUDA activity (gaps inflated)"
        return out


class _NoEvents(RuntimeError):
    pass


def _profile_once(step, activities, top):
    from torch.autograd import DeviceType
    from torch.profiler import profile

    cuda = DEVICE.type == "cuda"
    _sync()
    with profile(activities=activities) as prof:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            wall = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            step()
            wall = (time.perf_counter() - t0) * 1e3
    want = DeviceType.CUDA if cuda else DeviceType.CPU
    groups, spans = {}, []
    for e in prof.events():
        if e.device_type != want:
            continue
        if cuda:
            t_start, t_end = e.time_range.start, e.time_range.end
            spans.append((t_start, t_end))
            us = t_end - t_start
        else:
            us = e.self_cpu_time_total
        short = _short_name(e.name)
        g = groups.setdefault(short, {"name": short, "calls": 0, "ms": 0.0, "full_name": e.name[:300]})
        g["calls"] += 1
        g["ms"] += us / 1e3
    if not groups:
        raise _NoEvents(f"the profiler recorded no {'GPU kernel' if cuda else 'CPU'} events"
                        + (" (CUPTI unavailable?)" if cuda else ""))
    kernel_ms = sum(g["ms"] for g in groups.values())
    busy_ms = kernel_ms
    if cuda:  # the union of the kernels' intervals (one stream: no overlap, but be safe)
        busy_us, reach = 0.0, -math.inf
        for t_start, t_end in sorted(spans):
            if t_end > reach:
                busy_us += t_end - max(t_start, reach)
                reach = t_end
        busy_ms = busy_us / 1e3
    ranked = sorted(groups.values(), key=lambda g: -g["ms"])
    rest = ranked[top:]
    return {
        "activity": "+".join(str(a).split(".")[-1].lower() for a in activities)
        + ("" if cuda else " (interpreter: torch ops, self time)"),
        "wall_ms": wall, "kernel_ms": kernel_ms, "busy_ms": busy_ms,
        "gap_ms": max(0.0, wall - busy_ms), "gap_share": max(0.0, wall - busy_ms) / wall if wall > 0 else None,
        "n_events": sum(g["calls"] for g in ranked), "n_kinds": len(ranked),
        "kernels": ranked[:top],
        "other": {"kinds": len(rest), "calls": sum(g["calls"] for g in rest), "ms": sum(g["ms"] for g in rest)},
    }


def run_breakdown(T, cfg, budget_s):
    """Forward alone, forward+backward, and one profiled forward+backward per case at length T."""
    res = {"T": T, "cases": []}
    builds = {name: build for _, name, build in timing_plan([T], cfg)}
    reps = cfg["reps"] if T <= 16384 else max(1, cfg["reps"] - 2)
    for name in BREAKDOWN_CASES:
        row = {"case": name}
        res["cases"].append(row)
        if _elapsed() > budget_s:
            row["status"] = _skipped(budget_s)
            continue
        t0, step = time.time(), None
        try:
            step, row["note"] = builds[name]()
            step()  # warm-up: compiles and autotunes
            step.forward()
            _sync()
            row["fwd_ms"] = time_fwd_bwd(step.forward, 0, reps)
            row["fwd_bwd_ms"] = time_fwd_bwd(step, 0, reps)
            row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
            row["reps"] = reps
            row["status"] = "ok"
            try:
                row["profile"] = profile_step(step)
            except Exception as exc:  # CUPTI missing, a profiler bug, OOM: the timings stand
                row["profile_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        except Unavailable as exc:
            row["status"] = f"unavailable: {exc}"
        except Exception as exc:
            row["status"] = _error_status(exc)
            if not _is_oom(exc):
                row["traceback"] = traceback.format_exc()[-2000:]
        finally:
            step = None  # noqa: F841
            _free()
        row["case_s"] = round(time.time() - t0, 1)
        took = f" fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['fwd_bwd_ms']:.2f} ms" if "fwd_bwd_ms" in row else ""
        prof = " (profile: " + ("ok" if "profile" in row else row.get("profile_error", "-")[:80]) + ")"
        print(f"[{_elapsed():6.1f}s] breakdown T={T} {name:12s} {row['status']}{took}"
              f"{prof if row['status'] == 'ok' else ''}", flush=True)
    return res


def print_breakdown(bd, top=8):
    if "cases" not in bd:
        print(f"\nkernel breakdown: {bd.get('status')}")
        return
    print(f"\nkernel breakdown at T={bd['T']} (fwd+bwd; per kernel: total ms, calls; gaps = wall - kernel busy)")
    for row in bd["cases"]:
        if row.get("status") != "ok":
            print(f"  {row['case']:12s} {row.get('status')}")
            continue
        head = (f"  {row['case']:12s} fwd {row['fwd_ms']:.2f} | bwd {row['bwd_ms']:.2f} | "
                f"fwd+bwd {row['fwd_bwd_ms']:.2f} ms")
        prof = row.get("profile")
        if prof is None:
            print(f"{head}; profile: {row.get('profile_error')}")
            continue
        share = f" ({100 * prof['gap_share']:.1f}%)" if prof["gap_share"] is not None else ""
        print(f"{head}; profiled {prof['wall_ms']:.2f} = kernels {prof['busy_ms']:.2f} + gaps "
              f"{prof['gap_ms']:.2f}{share}; {prof['n_events']} launches")
        for g in prof["kernels"][:top]:
            print(f"      {g['ms']:9.3f} ms {g['calls']:5d}x  {g['name']}")
        rest = prof["kernels"][top:]
        n_rest = len(rest) + prof["other"]["kinds"]
        if n_rest:
            ms = sum(g["ms"] for g in rest) + prof["other"]["ms"]
            print(f"      {ms:9.3f} ms        ({n_rest} more kinds)")


# ---------------------------------------------------------------------------------------------
# 4. WKV-7 variant sweep


VARIANT_CHUNKS = (16, 32, 64)
VARIANT_PAIR_MODES = ("exact", "factored")
NO_PAIR_MODE = "unavailable (no pair_mode)"


def _add_vs_default(rows, skip=None):
    """``vs_default`` = the same T's default ms / this row's ms, on every timed row but ``skip``."""
    for row in rows:
        base = next((r.get("ms") for r in rows if r["T"] == row["T"] and r["variant"] == "default"), None)
        if "ms" in row and row["variant"] != skip:
            row["vs_default"] = base / row["ms"] if base else None


def _variant_label(chunk, mode):
    if chunk is None and mode is None:
        return "default"
    return f"L{chunk}" + (f"/{mode}" if mode else "")


def run_variants(lengths, cfg, budget_s, main_rows):
    """``wkv7_triton`` at each chunk size and pair mode, fwd+bwd, against the default call."""
    import inspect

    from megatron_rwkvx.kernels.wkv7 import triton_backend as tb

    fn0 = tb.wkv7_triton
    params = inspect.signature(fn0).parameters
    pair_ok = "pair_mode" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    H, D = cfg["heads"], cfg["head_size"]
    res = {"lengths": lengths, "chunk_sizes": list(VARIANT_CHUNKS), "pair_modes": list(VARIANT_PAIR_MODES),
           "default_chunk_size": getattr(tb, "DEFAULT_CHUNK_SIZE", None),
           "module_pair_modes": list(getattr(tb, "PAIR_MODES", ())) or None,
           "pair_mode_supported": pair_ok, "tolerance": 2e-2, "rows": []}
    fla_ms = {r["T"]: r["ms"] for r in main_rows if r["case"] == "wkv7_fla" and "ms" in r}
    fla_call, fla_note = (None, "fla needs CUDA") if DEVICE.type != "cuda" else (None, None)
    for T in lengths:
        reps = cfg["reps"] if T <= 16384 else max(1, cfg["reps"] - 2)
        xs = y_def = None
        queue = [(None, None)] + [(L, M) for L in VARIANT_CHUNKS for M in VARIANT_PAIR_MODES]
        if not pair_ok:
            queue += [(L, None) for L in VARIANT_CHUNKS]
        i = 0
        while i < len(queue):
            L, M = queue[i]
            i += 1
            row = {"T": T, "variant": _variant_label(L, M), "chunk_size": L, "pair_mode": M}
            res["rows"].append(row)
            if M is not None and not pair_ok:
                row["status"] = NO_PAIR_MODE
                continue
            if _elapsed() > budget_s:
                row["status"] = _skipped(budget_s)
                continue
            t0 = time.time()
            kw = {"initial_state": None}
            if L is not None:
                kw["chunk_size"] = L
            if M is not None:
                kw["pair_mode"] = M

            def fn(*a, kw=kw):
                return fn0(*a, **kw)

            try:
                if xs is None:  # the main WKV timing's inputs
                    xs = [t.requires_grad_(True) for t in wkv_inputs(1, T, H, D, DTYPE, seed=T)]
                with torch.no_grad():
                    y = fn(*xs)[0]
                if L is None and M is None:
                    y_def = y
                elif y_def is not None:
                    row["y_rms_vs_default"] = _rms_ratio(y, y_def)
                    row["correct"] = row["y_rms_vs_default"] < res["tolerance"]
                y = None
                row["ms"] = time_fwd_bwd(_grad_step(fn, xs), cfg["warmup"], reps)
                row["reps"] = reps
                row["status"] = "ok"
            except TypeError as exc:
                if M is not None and "pair_mode" in str(exc):
                    row["status"] = NO_PAIR_MODE
                    if pair_ok:  # the signature promised it; time the chunk sizes alone instead
                        pair_ok = res["pair_mode_supported"] = False
                        queue += [(L2, None) for L2 in VARIANT_CHUNKS if (L2, None) not in queue]
                else:
                    row["status"] = _error_status(exc)
                    row["traceback"] = traceback.format_exc()[-2000:]
            except Exception as exc:
                row["status"] = _error_status(exc)
                if not _is_oom(exc):
                    row["traceback"] = traceback.format_exc()[-2000:]
            finally:
                y = None
                _free()
            row["case_s"] = round(time.time() - t0, 1)
            took = f" {row['ms']:.2f} ms" if "ms" in row else ""
            rms = f", y rms {row['y_rms_vs_default']:.1e}" if "y_rms_vs_default" in row else ""
            print(f"[{_elapsed():6.1f}s] variant T={T} {row['variant']:12s} {row['status']}{took}{rms}", flush=True)
        xs = y_def = None
        _free()
        if T not in fla_ms and DEVICE.type == "cuda":
            # fla was not timed at this T by the main table: time it here, last.
            row = {"T": T, "variant": "fla", "chunk_size": None, "pair_mode": None}
            res["rows"].append(row)
            if _elapsed() > budget_s:
                row["status"] = _skipped(budget_s)
            else:
                if fla_call is None and fla_note is None:
                    fla_call, fla_note = fla_chunk_rwkv7()
                t0 = time.time()
                try:
                    if fla_call is None:
                        raise Unavailable(fla_note)
                    xf = [t.requires_grad_(True) for t in wkv_inputs(1, T, H, D, DTYPE, seed=T)]
                    row["ms"] = fla_ms[T] = time_fwd_bwd(_grad_step(fla_call, xf), cfg["warmup"], reps)
                    row["status"] = "ok"
                except Unavailable as exc:
                    row["status"] = f"unavailable: {exc}"
                except Exception as exc:
                    row["status"] = _error_status(exc)
                finally:
                    xf = None  # noqa: F841
                    _free()
                row["case_s"] = round(time.time() - t0, 1)
    _add_vs_default(res["rows"], skip="fla")
    for row in res["rows"]:
        if "vs_default" in row:
            row["vs_fla"] = fla_ms[row["T"]] / row["ms"] if row["T"] in fla_ms else None
    res["fla_ms"] = fla_ms
    return res


def print_variants(var):
    if "rows" not in var:
        print(f"\nWKV-7 variants: {var.get('status')}")
        return
    print("\nWKV-7 variants, fwd+bwd (speed-up = other ms / this ms; > 1: this one is faster)")
    print(f"{'T':>7} | {'variant':13s} | {'ms':>8} | {'vs default':>10} | {'vs fla':>7} | y rms vs default")
    for T in var["lengths"]:
        rows = [r for r in var["rows"] if r["T"] == T]
        timed = [r for r in rows if "ms" in r and r["variant"] != "fla"]
        best = min(timed, key=lambda r: r["ms"]) if timed else None
        for r in rows:
            if "ms" not in r:
                print(f"{T:>7} | {r['variant']:13s} | {r['status']}")
                continue
            vd = f"{r['vs_default']:.2f}x" if r.get("vs_default") else "-"
            vf = f"{r['vs_fla']:.2f}x" if r.get("vs_fla") else "-"
            rms = f"{r['y_rms_vs_default']:.1e}" + ("" if r["correct"] else " FAIL") if "y_rms_vs_default" in r else "-"
            mark = " *fastest" if r is best else ""
            print(f"{T:>7} | {r['variant']:13s} | {r['ms']:8.2f} | {vd:>10} | {vf:>7} | {rms}{mark}")


# ---------------------------------------------------------------------------------------------
# 5. sparse-attention variant sweep


SPARSE_VARIANTS = (
    ("default", {}, True),  # autotuned block sizes, the default pair tile
    ("pair_tile128", {"pair_tile": 128}, True),
    ("fixed_blocks", {}, False),  # RWKVX_TRITON_AUTOTUNE=0: the fixed first-guess blocks
)


def _autotune_choices() -> dict:
    """The configurations the autotuners picked so far, per kernel and key (JSON-friendly)."""
    out = {}
    try:
        from megatron_rwkvx.kernels.sparse_attention import triton_backend as sb
        from megatron_rwkvx.kernels.wkv7 import triton_backend as wb
    except Exception as exc:  # an older checkout without autotuned sparse kernels
        return {"error": _error_status(exc)}
    tuners = {f"sparse.{n}.d{bd}": t for (n, bd), t in getattr(sb, "_tuned_cache", {}).items() if t is not None}
    tuners.update({f"wkv7.{n}": getattr(wb, n) for n in dir(wb) if n.endswith("_tuned") and hasattr(getattr(wb, n), "cache")})
    for name, tuner in tuners.items():
        for key, config in getattr(tuner, "cache", {}).items():
            out.setdefault(name, []).append({"key": [str(k) for k in key], "config": str(config)})
    return out


def run_sparse_variants(lengths, cfg, budget_s):
    """Our sparse attention with autotuned blocks (default), a 128-pair tile, and the fixed blocks,
    fwd+bwd, against the default; out against the default's out."""
    from megatron_rwkvx.kernels.sparse_attention.triton_backend import topk_chunk_attention_triton

    H, D, chunk, top_k = cfg["heads"], cfg["head_size"], cfg["chunk"], cfg["top_k"]
    res = {"lengths": lengths, "variants": [v[0] for v in SPARSE_VARIANTS], "tolerance": 2e-2, "rows": []}
    for T in lengths:
        reps = cfg["reps"] if T <= 16384 else max(1, cfg["reps"] - 2)
        qkv = out_def = None
        for name, kw, tune in SPARSE_VARIANTS:
            row = {"T": T, "variant": name}
            res["rows"].append(row)
            if _elapsed() > budget_s:
                row["status"] = _skipped(budget_s)
                continue
            t0 = time.time()
            old = os.environ.get("RWKVX_TRITON_AUTOTUNE")
            os.environ["RWKVX_TRITON_AUTOTUNE"] = "1" if tune else "0"

            def fn(q, k, v, kw=kw):
                return topk_chunk_attention_triton(q, k, v, chunk_size=chunk, top_k=top_k, **kw)

            try:
                if qkv is None:  # the main table's sparse inputs
                    qkv = [_randn(1, T, H, D, seed=T + i).to(DTYPE).requires_grad_(True) for i in range(3)]
                with torch.no_grad():
                    out = fn(*qkv)
                if out_def is None:
                    out_def = out
                else:
                    row["out_rms_vs_default"] = _rms_ratio(out, out_def)
                    row["correct"] = row["out_rms_vs_default"] < res["tolerance"]
                out = None
                row["ms"] = time_fwd_bwd(_grad_step(fn, qkv), cfg["warmup"], reps)
                row["reps"] = reps
                row["status"] = "ok"
            except Exception as exc:
                row["status"] = _error_status(exc)
                if not _is_oom(exc):
                    row["traceback"] = traceback.format_exc()[-2000:]
            finally:
                out = None
                if old is None:
                    os.environ.pop("RWKVX_TRITON_AUTOTUNE", None)
                else:
                    os.environ["RWKVX_TRITON_AUTOTUNE"] = old
                _free()
            row["case_s"] = round(time.time() - t0, 1)
            took = f" {row['ms']:.2f} ms" if "ms" in row else ""
            print(f"[{_elapsed():6.1f}s] sparse variant T={T} {name:13s} {row['status']}{took}", flush=True)
        qkv = out_def = None
        _free()
    _add_vs_default(res["rows"])
    return res


def print_sparse_variants(var):
    if "rows" not in var:
        print(f"\nSparse-attention variants: {var.get('status')}")
        return
    print("\nSparse-attention variants, fwd+bwd (vs default = default ms / this ms)")
    print(f"{'T':>7} | {'variant':13s} | {'ms':>8} | {'vs default':>10} | out rms vs default")
    for r in var["rows"]:
        if "ms" not in r:
            print(f"{r['T']:>7} | {r['variant']:13s} | {r['status']}")
            continue
        vd = f"{r['vs_default']:.2f}x" if r.get("vs_default") else "-"
        rms = f"{r['out_rms_vs_default']:.1e}" + ("" if r["correct"] else " FAIL") if "out_rms_vs_default" in r else "-"
        print(f"{r['T']:>7} | {r['variant']:13s} | {r['ms']:8.2f} | {vd:>10} | {rms}")


# ---------------------------------------------------------------------------------------------
# summary


def _ratio(rows, T, baseline, ours):
    by = {(r["T"], r["case"]): r for r in rows}
    a, b = by.get((T, baseline), {}), by.get((T, ours), {})
    if "ms" in a and "ms" in b and b["ms"] > 0:
        return a["ms"] / b["ms"]
    return None


def summarize(rows, lengths):
    """Speed-up rows: baseline ms / ours ms (> 1: ours faster)."""
    out = []
    by = {(r["T"], r["case"]): r for r in rows}

    def ms(T, case):
        r = by.get((T, case), {})
        return r.get("ms"), r.get("status", "missing")

    for T in lengths:
        for label, ours, base in (
            ("WKV-7 ours vs fla", "wkv7_ours", "wkv7_fla"),
            ("sparse attn vs SDPA", "sparse_ours", "sdpa_dense"),
        ):
            o, so = ms(T, ours)
            b, sb = ms(T, base)
            out.append({"T": T, "what": label, "ours_ms": o, "baseline_ms": b,
                        "speedup": (b / o) if (o and b) else None,
                        "note": "" if (o and b) else f"ours: {so}; baseline: {sb}"})
        r, sb_, d = ms(T, "block_rwkv7")[0], ms(T, "block_sparse")[0], ms(T, "block_dense")[0]
        pair = (r + sb_) if (r and sb_) else None
        out.append({"T": T, "what": "layer pair vs dense layer", "ours_ms": pair, "baseline_ms": d,
                    "speedup": (d / pair) if (pair and d) else None,
                    "note": f"pair ns/token {pair / T * 1e6:.0f}" if pair else "missing block timings"})
        if r and sb_ and d:
            # The RWKV-X 3:1 pattern (RRRA) against the same depth of dense attention blocks.
            out[-1]["model_3to1_speedup"] = 4 * d / (3 * r + sb_)
    return out


def print_table(meta, checks, summary):
    print()
    print(f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']}")
    for c in checks:
        status = "PASS" if c.get("passed") else ("ERROR" if "error" in c else "FAIL")
        detail = c.get("error", f"worst rms {c.get('worst_rms', float('nan')):.2e} (tol {c.get('tolerance')})")
        extra = f", selection match {c['selection_match']:.4f}" if "selection_match" in c else ""
        print(f"  check {c['check']:30s} {status:5s} {detail}{extra}")
    print()
    print(f"{'T':>7} | {'comparison':27s} | {'ours ms':>9} | {'base ms':>9} | {'speedup':>7} | note")
    print("-" * 90)
    for s in summary:
        o = f"{s['ours_ms']:.2f}" if s["ours_ms"] else "-"
        b = f"{s['baseline_ms']:.2f}" if s["baseline_ms"] else "-"
        sp = f"{s['speedup']:.2f}x" if s["speedup"] else "-"
        note = s["note"]
        if "model_3to1_speedup" in s:
            note += f"; 3:1 model {s['model_3to1_speedup']:.2f}x"
        print(f"{s['T']:>7} | {s['what']:27s} | {o:>9} | {b:>9} | {sp:>7} | {note}")


def main():
    import triton

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"CPU ({platform.processor() or 'unknown'}), Triton interpreter",
        "capability": list(torch.cuda.get_device_capability()) if DEVICE.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "mode": "cpu-smoke" if SMOKE else ("quick" if ARGS.quick else "full"),
        "dtype": str(DTYPE),
        "sparse_backends": sparse_backends(torch.zeros(1, device=DEVICE)),
        "wkv_backends": wkv_backends(torch.zeros(1, device=DEVICE)),
        "megatron_imported": any(m == "megatron" or m.startswith("megatron.") for m in sys.modules),
        "package_init_ran": hasattr(sys.modules["megatron_rwkvx"], "load_pretrained"),
    }
    print(f"gpu_check: {meta['mode']} on {meta['device']}", flush=True)

    sections = {}
    checks = []
    for name, thunk in correctness_checks():
        try:
            res = thunk()
        except Exception as exc:
            res = {"check": name, "passed": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                   "traceback": traceback.format_exc()[-2000:]}
        finally:
            _free()
        res["elapsed_s"] = round(_elapsed(), 1)
        print(f"[{_elapsed():6.1f}s] check {name}: {'PASS' if res.get('passed') else 'FAIL'}", flush=True)
        checks.append(res)
    sections["checks"] = [0.0, round(_elapsed(), 1)]

    if SMOKE:
        lengths = [32]
        cfg = dict(heads=2, head_size=16, chunk=16, top_k=3, warmup=0, reps=1)
        profile_length, variant_lengths, sparse_variant_lengths = 64, [64], [64]
    else:
        lengths = [4096, 16384] if ARGS.quick else [4096, 16384, 65536, 131072]
        cfg = dict(heads=32, head_size=64, chunk=2048, top_k=3, warmup=1, reps=5)
        profile_length, variant_lengths = (16384, [16384]) if ARGS.quick else (65536, [16384, 131072])
        sparse_variant_lengths = [16384] if ARGS.quick else [131072]
    if ARGS.lengths:
        lengths = [int(x) for x in ARGS.lengths.split(",")]
    if ARGS.profile_length:
        profile_length = ARGS.profile_length
    if ARGS.variant_lengths:
        variant_lengths = [int(x) for x in ARGS.variant_lengths.split(",")]
    if ARGS.sparse_variant_lengths:
        sparse_variant_lengths = [int(x) for x in ARGS.sparse_variant_lengths.split(",")]
    cfg["sparse_backend"] = "triton" if "triton" in meta["sparse_backends"] else "torch"
    cfg["wkv_backend"] = "triton" if "triton" in meta["wkv_backends"] else "chunked"
    budget = ARGS.budget_s if ARGS.budget_s is not None else (200.0 if ARGS.quick else 400.0)
    meta["budget_s"] = budget

    def section(name, fn, skip_reason):
        """Run one section unless skipped; an unexpected error is recorded, never raised."""
        if skip_reason:
            return {"status": f"skipped ({skip_reason})"}
        t0 = round(_elapsed(), 1)
        try:
            out = fn()
        except Exception as exc:
            out = {"status": _error_status(exc), "traceback": traceback.format_exc()[-2000:]}
            print(f"[{_elapsed():6.1f}s] {name}: {out['status']}", flush=True)
        sections[name] = [t0, round(_elapsed(), 1)]
        return out

    # The most valuable numbers first: the main table at 16K and 128K, then the breakdown, then
    # the variants, then the main table's other lengths; one time budget gates every case.
    first = [T for T in (16384, 131072) if T in lengths]
    rest = [T for T in lengths if T not in first]
    skip = "--skip-timing" if ARGS.skip_timing else None
    rows = section("timing_first", lambda: run_timing(first, cfg, budget), skip) if first else []
    rows = rows if isinstance(rows, list) else []
    breakdown = section("breakdown", lambda: run_breakdown(profile_length, cfg, budget),
                        skip or ("--no-profile" if ARGS.no_profile else None))
    variants = section("variants", lambda: run_variants(variant_lengths, cfg, budget, rows),
                       skip or ("--no-variants" if ARGS.no_variants else None))
    no_sparse = "--no-sparse-variants" if ARGS.no_sparse_variants else None
    if cfg["sparse_backend"] != "triton":
        no_sparse = no_sparse or "no triton sparse backend"
    sparse_variants = section("sparse_variants", lambda: run_sparse_variants(sparse_variant_lengths, cfg, budget),
                              skip or no_sparse)
    if rest:
        more = section("timing_rest", lambda: run_timing(rest, cfg, budget), skip)
        rows += more if isinstance(more, list) else []
    summary = summarize(rows, sorted(lengths)) if rows else []

    meta["total_s"] = round(_elapsed(), 1)
    results = {"meta": meta, "config": cfg, "lengths": lengths, "sections_s": sections, "checks": checks,
               "timing": rows, "summary": summary, "breakdown": breakdown, "variants": variants,
               "sparse_variants": sparse_variants, "autotune_choices": _autotune_choices()}
    if ARGS.out:
        Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
        with open(ARGS.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    print_breakdown(breakdown)
    print_variants(variants)
    print_sparse_variants(sparse_variants)
    print_table(meta, checks, summary)
    return 0 if all(c.get("passed") for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
