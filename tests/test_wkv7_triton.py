"""The Triton RWKV-7 kernels against the naive token-loop reference, on the CPU via Triton's
interpreter.

``TRITON_INTERPRET=1`` only takes effect for kernels defined after it is set (``triton.jit``
reads it when it decorates), and other tests may already have imported the backend compiled for
a GPU, so the comparisons run in one child process started with the variable set: this file,
run as a script, prints one JSON line with every measured error. Interpreter runs are slow
(about 1 s per chunk and head for forward plus backward), so the shapes stay tiny. bf16 is not
tested here: ``tl.dot`` on bf16 is broken in the interpreter (the kernels only multiply fp32
tiles, but bf16 inputs select TF32 products on the GPU; that path needs a GPU run).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

FP32_TOL = 1e-5  # norm-wise relative error
FP16_TOL = 5e-3  # RMS(error) / RMS(reference)
OUTPUTS = ("y", "final_state", "dr", "dw", "dk", "dv", "da", "db", "d_initial_state")

# name: (B, T, H, N, dtype, with initial state, chunk_size, decay, loss on the final state)
CASES = {
    "fp32_T1_init": (2, 1, 1, 16, "float32", True, None, "model", True),
    "fp32_T15_no_init_y_only": (1, 15, 2, 16, "float32", False, None, "model", False),
    "fp32_T37_padded": (1, 37, 2, 16, "float32", True, None, "model", True),
    "fp32_N64": (1, 20, 1, 64, "float32", True, None, "model", True),
    "fp32_chunk32_strong_decay": (1, 40, 1, 16, "float32", True, 32, "strong", True),
    "fp16_T37": (1, 37, 2, 16, "float16", True, None, "model", True),
    "fp32_T37_exact": (1, 37, 2, 16, "float32", True, None, "model", True),
    "fp32_chunk64_factored": (1, 70, 1, 16, "float32", True, 64, "model", True),
    "fp32_near_bound_factored": (1, 33, 1, 16, "float32", True, None, "bounded", True),
    "fp16_chunk32_exact": (1, 40, 1, 16, "float16", True, 32, "model", True),
}
# Cases that force the pair-matrix path; the others use "auto" (factored for "model" decays, the
# exact path for "strong" ones, whose chunk * max|w| exceeds the limit).
PAIR_MODE = {"fp32_T37_exact": "exact", "fp32_chunk64_factored": "factored",
             "fp32_near_bound_factored": "factored", "fp16_chunk32_exact": "exact"}


def _inputs(B, T, H, N, decay, seed):
    """Model-like inputs: a = -kk, b = kk * rate with kk unit-norm per head, log-decay in
    [-0.61, 0) ("model"), spread down to about -20 with some channels exactly 0 ("strong"), or
    down to -3.6 ("bounded": chunk 16's factored rescale reaches e^57, near the limit of 60)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    r, k, v = (randn(B, T, H, N) * 0.5 for _ in range(3))
    if decay == "model":
        w = -torch.exp(torch.tensor(-0.5)) * torch.sigmoid(randn(B, T, H, N))
    elif decay == "bounded":
        w = -3.6 * torch.sigmoid(randn(B, T, H, N) + 3.0)
        w[..., : N // 4] = 0.0
    else:
        w = -torch.exp(randn(B, T, H, N) * 1.5)
        w[..., : N // 4] = 0.0
        w = w.clamp(min=-20.0)
    kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
    rate = torch.sigmoid(randn(B, T, H, N))
    state = randn(B, H, N, N) * 0.3
    return (r, w, k, v, -kk, kk * rate), state


def _run(backend, xs, state, chunk_size, dy, dstate, pair_mode=None):
    from megatron_rwkvx.kernels.wkv7 import wkv7

    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    state = None if state is None else state.detach().clone().requires_grad_(True)
    if pair_mode is None:
        y, final = wkv7(*xs, state, backend=backend, chunk_size=chunk_size)
    else:
        from megatron_rwkvx.kernels.wkv7.triton_backend import wkv7_triton

        y, final = wkv7_triton(*xs, state, chunk_size=chunk_size, pair_mode=pair_mode)
    loss = (y.float() * dy).sum()
    if dstate is not None:
        loss = loss + (final * dstate).sum()
    loss.backward()
    grads = [x.grad for x in xs] + [None if state is None else state.grad]
    return [y, final] + grads


def _compare_case(name):
    B, T, H, N, dtype_name, with_init, chunk, decay, state_loss = CASES[name]
    dtype = getattr(torch, dtype_name)
    xs, state = _inputs(B, T, H, N, decay, seed=sum(map(ord, name)))
    xs = [x.to(dtype) for x in xs]
    state = state if with_init else None
    gen = torch.Generator().manual_seed(7)
    # Representable in the input dtype, so both backends see the same output gradient.
    dy = torch.randn(B, T, H, N, generator=gen).to(dtype).float()
    dstate = torch.randn(B, H, N, N, generator=gen) if state_loss else None
    got = _run("triton", xs, state, chunk, dy, dstate, PAIR_MODE.get(name))
    # The reference sees the same (rounded) values in fp32.
    ref = _run("naive", [x.float() for x in xs], state, None, dy, dstate)
    errors = {}
    for out_name, g, r in zip(OUTPUTS, got, ref):
        if r is None:
            errors[out_name] = None if g is None else "unexpected gradient"
            continue
        g = g.float()
        if not torch.isfinite(g).all():
            errors[out_name] = float("inf")
            continue
        errors[out_name] = ((g - r).norm() / r.norm().clamp_min(1e-30)).item()
    errors["dtypes"] = [str(got[0].dtype), str(got[1].dtype)]
    return errors


def _error_messages():
    """The backend's own input checks (reached only where the device is acceptable)."""
    from megatron_rwkvx.kernels.wkv7.triton_backend import _check, wkv7_triton

    (r, w, k, v, a, b), _ = _inputs(1, 4, 1, 16, "model", seed=0)
    (_, strong_w, *_), _ = _inputs(1, 4, 1, 16, "strong", seed=0)
    out = {
        "auto_model_decay_factored": _check(r, w, None, "auto")[1],
        "auto_model_decay_chunk64_factored": _check(r, w, 64, "auto")[1],
        "auto_strong_decay_factored": _check(r, strong_w, 16, "auto")[1],
    }
    attempts = {
        "chunk_size": lambda: wkv7_triton(r, w, k, v, a, b, chunk_size=8),
        "positive_w": lambda: wkv7_triton(r, -w, k, v, a, b),
        "head_size": lambda: wkv7_triton(*(torch.zeros(1, 2, 1, 256) for _ in range(6))),
        "pair_mode": lambda: wkv7_triton(r, w, k, v, a, b, pair_mode="fast"),
        "factored_strong": lambda: wkv7_triton(r, strong_w, k, v, a, b, pair_mode="factored"),
    }
    for key, fn in attempts.items():
        try:
            fn()
            out[key] = "no error"
        except ValueError as exc:
            out[key] = str(exc)
    return out


def _main():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    results = {name: _compare_case(name) for name in CASES}
    results["__errors__"] = _error_messages()
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_matches_naive(interpreter_results, case):
    errors = interpreter_results[case]
    dtype_name, with_init = CASES[case][4], CASES[case][5]
    tol = FP32_TOL if dtype_name == "float32" else FP16_TOL
    assert errors["dtypes"] == [f"torch.{dtype_name}", "torch.float32"]
    for out_name in OUTPUTS:
        err = errors[out_name]
        if out_name == "d_initial_state" and not with_init:
            assert err is None
            continue
        assert err is not None and err < tol, f"{case}: {out_name} relative error {err} >= {tol}"


def test_triton_rejects_bad_arguments(interpreter_results):
    msgs = interpreter_results["__errors__"]
    assert "chunk_size must be one of" in msgs["chunk_size"]
    assert "log decay" in msgs["positive_w"]
    assert "head size 256" in msgs["head_size"]
    assert "pair_mode must be one of" in msgs["pair_mode"]
    assert "pair_mode='factored' needs chunk_size * max|w|" in msgs["factored_strong"]
    assert msgs["auto_model_decay_factored"] is True
    assert msgs["auto_model_decay_chunk64_factored"] is True
    assert msgs["auto_strong_decay_factored"] is False


def test_triton_refuses_cpu_tensors_without_interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this process runs Triton's interpreter")
    from megatron_rwkvx.kernels.wkv7 import available_backends, wkv7

    x = torch.zeros(1, 2, 1, 16)
    assert "triton" not in available_backends(x)
    with pytest.raises(RuntimeError, match="cannot run on device cpu"):
        wkv7(x, x, x, x, x, x, backend="triton")


def test_default_path_compiles_for_hopper():
    """The GPU default (chunk 16, factored pair matrices, bf16, head size 64) compiles to sm_90 in
    every autotune configuration, and each kernel has one that keeps to its registers."""
    pytest.importorskip("triton")
    from megatron_rwkvx.kernels.wkv7.triton_backend import _INTERPRET

    if _INTERPRET:
        pytest.skip("kernels imported under the interpreter cannot be compiled")
    from megatron_rwkvx.kernels.wkv7.triton_compile_check import compile_all

    results = compile_all("bf16", 64, 90, chunks=(16,), paths=(True,))
    best = {}
    for name, info in results.items():
        kernel = name.split()[0]
        best[kernel] = min(best.get(kernel, 1 << 30), info["spill_bytes"])
    assert set(best) == {"prep_fwd", "prep_bwd", "bwd_chunk", "fwd_scan", "bwd_scans"}
    # bwd_chunk (every gradient of a chunk in one program) uses all 255 registers at 8 warps
    # without spilling: the tightest; a spill here means a change pushed it past the register file.
    assert all(spill == 0 for spill in best.values()), best


if __name__ == "__main__":
    _main()
