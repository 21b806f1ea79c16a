"""Triton top-k chunk attention against the dense reference, on the CPU through the interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported and must not leak into other tests,
so the comparisons run once, in a subprocess that executes this file as a script and prints JSON;
the tests below read that report. bf16 is left out: ``tl.dot`` on bf16 is broken in the
interpreter (the GPU check script covers bf16). A second test compiles every kernel for sm_90
(Hopper) without a GPU, which catches what the interpreter does not check (globals, dtypes of
loop-carried values, dot shapes, register spills).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# name: dtype, B, Tq, Tk, Hq, Hkv, D, chunk, top_k, q_offset
CASES = {
    "fp32_gqa_ragged": ("float32", 1, 75, 75, 4, 2, 16, 16, 3, 0),
    "fp32_offset_extra_keys": ("float32", 2, 37, 70, 2, 1, 32, 16, 2, 21),
    "fp32_top1_own_chunk_only": ("float32", 1, 70, 70, 2, 2, 16, 32, 1, 0),
    "fp32_d64_chunk48": ("float32", 1, 110, 110, 2, 1, 64, 48, 2, 0),
    "fp32_d128": ("float32", 1, 40, 40, 1, 1, 128, 16, 3, 0),
    "fp32_d24_padded_head": ("float32", 1, 40, 40, 2, 2, 24, 16, 2, 0),
    # 3 key blocks per chunk in the dk/dv program order, 8 blocks: a padded last group.
    "fp32_chunk96_grouped_blocks": ("float32", 1, 250, 250, 2, 1, 16, 96, 3, 0),
    "fp16_gqa_offset": ("float16", 1, 75, 80, 4, 2, 32, 16, 3, 5),
    "fp16_d64": ("float16", 1, 100, 100, 2, 1, 64, 32, 3, 0),
    # selection="quest": the chunks scored by Quest's bound (selection keys of width 2D).
    "fp32_quest_gqa_ragged": ("float32", 1, 75, 75, 4, 2, 16, 16, 3, 0),
    "fp16_quest_offset": ("float16", 1, 75, 80, 4, 2, 32, 16, 3, 5),
}
FP32_TOL = 1e-5  # max |a - b| / max |b|
FP16_TOL = 5e-3  # rms(a - b) / rms(b), against fp32 math on the same fp16 inputs


def _interpreter_report() -> dict:
    """Runs inside the subprocess (TRITON_INTERPRET=1): every case, the selection, the API paths."""
    from megatron_rwkvx.kernels.sparse_attention import (
        available_backends,
        chunk_mean_keys,
        chunk_selection_keys,
        select_chunks,
        selection_queries,
        topk_chunk_attention,
    )
    from megatron_rwkvx.kernels.sparse_attention.triton_backend import topk_chunk_attention_triton
    from megatron_rwkvx.kernels.sparse_attention.triton_select import (
        chunk_mean_keys_triton,
        select_chunks_triton,
    )

    def errors(got, want, fp32):
        out = {}
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            a, b = a.double(), b.double()
            if fp32:
                out[name] = ((a - b).abs().max() / b.abs().max()).item()
            else:
                out[name] = ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()
        return out

    def run(backend, q, k, v, grad, **kw):
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = topk_chunk_attention(q, k, v, backend=backend, **kw)
        out.backward(grad.to(out.dtype))
        return out.detach(), q.grad, k.grad, v.grad

    report = {"backends": available_backends(torch.zeros(1))}
    for name, (dtype, b, tq, tk, hq, hkv, d, chunk, top_k, off) in CASES.items():
        gen = torch.Generator().manual_seed(hash(name) % 1000)
        dt = getattr(torch, dtype)
        q = torch.randn(b, tq, hq, d, generator=gen).to(dt)
        k = torch.randn(b, tk, hkv, d, generator=gen).to(dt)
        v = torch.randn(b, tk, hkv, d, generator=gen).to(dt)
        grad = torch.randn(b, tq, hq, d, generator=gen)
        kw = dict(chunk_size=chunk, top_k=top_k, q_offset=off, selection="quest" if "quest" in name else "mean")
        got = run("triton", q, k, v, grad, **kw)
        want = run("reference", q.float(), k.float(), v.float(), grad, **kw)
        report[name] = errors(got, want, dtype == "float32")
        report[name]["dtypes_kept"] = all(t.dtype == dt for t in got)

    # Another pair tile (16 pairs per streamed chunk instead of the interpreter's 32): the same
    # results, and the upper-bound grid's spare programs differ.
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 150, 4, 32, generator=gen) for _ in range(3))
    k, v = k[:, :, :2].contiguous(), v[:, :, :2].contiguous()
    grad = torch.randn(1, 150, 4, 32, generator=gen)
    got = []
    for tile in (16, None):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = topk_chunk_attention_triton(*leaves, chunk_size=16, top_k=4, pair_tile=tile)
        out.backward(grad)
        got.append((out.detach(), *(t.grad for t in leaves)))
    want = run("reference", q, k, v, grad, chunk_size=16, top_k=4)
    report["fp32_pair_tile16"] = errors(got[0], want, True)
    report["fp32_pair_tile16"]["dtypes_kept"] = True
    report["pair_tile_same_as_default"] = max((a - b).abs().max().item() for a, b in zip(*got))

    # Every configuration of the GPU autotune sets (block sizes, including key blocks wider than
    # the chunk and query tiles wider than the sequence) against the reference, each forced in
    # turn as the fixed launch; pair tiles 64 and 128 alternate.
    from megatron_rwkvx.kernels.sparse_attention import triton_backend as tb
    from megatron_rwkvx.kernels.sparse_attention.triton_config import tuned_configs

    tuned_errs = {}
    plain = tb._Launcher
    try:
        for d, t in ((64, 160), (128, 70)):
            sets = tuned_configs(d)
            gen = torch.Generator().manual_seed(d)
            q = torch.randn(1, t, 4, d, generator=gen)
            k, v = (torch.randn(1, t, 2, d, generator=gen) for _ in range(2))
            grad = torch.randn(1, t, 4, d, generator=gen)
            want = run("reference", q, k, v, grad, chunk_size=24, top_k=3)
            for i in range(max(len(c) for c in sets.values())):
                class Forced(plain):
                    def __init__(self, q, tq):
                        super().__init__(q, tq)
                        self.fixed = {n: c[i % len(c)] for n, c in sets.items()}
                        self.tune = False

                tb._Launcher = Forced
                leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
                out = topk_chunk_attention_triton(*leaves, chunk_size=24, top_k=3, pair_tile=(64, 128)[i % 2])
                out.backward(grad)
                got = (out.detach(), *(x.grad for x in leaves))
                tuned_errs[f"d{d}_config{i}"] = max(errors(got, want, True).values())
    finally:
        tb._Launcher = plain
    report["tuned_config_errors"] = tuned_errs

    # Selection: exact equality with the shared PyTorch selection, with GQA and offsets. Random
    # data has no near-ties; small integers make every score exact whatever the summation order,
    # so repeated chunks give exact ties that check the tie-break (lower chunk index first).
    # Repeated chunks of random data would not do: torch's matmul rounds equal columns
    # differently by position, so its own "ties" are decided by rounding.
    gen = torch.Generator().manual_seed(3)
    sel = {}
    for kind in ("random", "integer_ties"):
        if kind == "random":
            q = torch.randn(2, 90, 4, 16, generator=gen)
            k = torch.randn(2, 130, 2, 16, generator=gen)
        else:
            q = torch.randint(-2, 3, (2, 90, 4, 16), generator=gen).float()
            k = torch.randint(-1, 2, (2, 130, 2, 16), generator=gen).float()
            k[:, 48:64] = k[:, 16:32]
            k[:, 64:80] = k[:, 0:16]
            k[:, 80:96] = k[:, 16:32]
        # Chunk 2 gives up to 61 past chunks: several blocks of the kernel's chunk loop, so the
        # merge of the running list with a new block (and its tie rule) runs too.
        for top_k, off, chunk in ((2, 0, 16), (4, 40, 16), (6, 33, 16), (4, 30, 2)):
            n = (off + q.shape[1] - 1) // chunk
            keys = chunk_mean_keys(k, chunk, n)
            want = select_chunks(q, keys, chunk_size=chunk, top_k=top_k, q_offset=off)
            got = select_chunks_triton(q, keys, chunk_size=chunk, top_k=top_k, q_offset=off)
            sel[f"{kind}_top{top_k}_off{off}_chunk{chunk}"] = bool(torch.equal(got.long(), want))
            keys, queries = chunk_selection_keys(k, chunk, n, "quest"), selection_queries(q, "quest")
            want = select_chunks(queries, keys, chunk_size=chunk, top_k=top_k, q_offset=off)
            got = select_chunks_triton(queries, keys, chunk_size=chunk, top_k=top_k, q_offset=off)
            sel[f"quest_{kind}_top{top_k}_off{off}_chunk{chunk}"] = bool(torch.equal(got.long(), want))
        if kind == "integer_ties":
            keys = chunk_mean_keys(k, 16, 6)
            scores = torch.einsum("bthd,bnhd->bthn", q[:, :, ::2], keys)
            top2 = scores.topk(2, dim=-1).values
            report["tied_queries"] = int((top2[..., 0] == top2[..., 1]).sum())
    report["selection_equal"] = sel
    keys = chunk_mean_keys(k, 16, 8)
    report["chunk_mean_err"] = (chunk_mean_keys_triton(k, 16, 8) - keys).abs().max().item()

    # A caller-supplied selection (context parallelism) gives the same result as the built-in one.
    q, k, v = q[:, :50], k[:, :50], k[:, :50].flip(1).contiguous()
    n = 49 // 16
    selected = select_chunks(q, chunk_mean_keys(k, 16, n), chunk_size=16, top_k=3)
    a = topk_chunk_attention_triton(q, k, v, chunk_size=16, top_k=3, selected=selected)
    b = topk_chunk_attention_triton(q, k, v, chunk_size=16, top_k=3)
    report["selected_passed_equal"] = bool(torch.equal(a, b))
    return report


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_registered_as_triton_backend(report):
    assert "triton" in report["backends"]


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("fp32")] + ["fp32_pair_tile16"])
def test_fp32_matches_reference(report, name):
    errs = report[name]
    assert errs["dtypes_kept"]
    for what in ("out", "dq", "dk", "dv"):
        assert errs[what] < FP32_TOL, f"{name} {what}: relative error {errs[what]:.2e}"


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("fp16")])
def test_fp16_matches_reference(report, name):
    errs = report[name]
    assert errs["dtypes_kept"]
    for what in ("out", "dq", "dk", "dv"):
        assert errs[what] < FP16_TOL, f"{name} {what}: rms error ratio {errs[what]:.2e}"


def test_every_autotune_configuration_matches_reference(report):
    errs = report["tuned_config_errors"]
    assert len(errs) == 6 + 4  # the longest set per head size (64: dk/dv, 128: own forward, dk/dv)
    bad = {k: e for k, e in errs.items() if not e < FP32_TOL}
    assert not bad, bad


def test_pair_tile_changes_no_result(report):
    assert report["pair_tile_same_as_default"] < 1e-6


def test_selection_is_exactly_the_shared_one(report):
    assert report["tied_queries"] > 100, "the integer input lost its exact ties"
    assert report["selection_equal"] == {k: True for k in report["selection_equal"]}
    assert len(report["selection_equal"]) == 16  # mean and quest
    assert report["chunk_mean_err"] < 1e-6


def test_caller_selection_matches_builtin(report):
    assert report["selected_passed_equal"]


def _compiled_kernels() -> bool:
    """Whether this process imported the kernels for a GPU (not under the interpreter)."""
    pytest.importorskip("triton")
    from megatron_rwkvx.kernels.sparse_attention.triton_config import INTERPRETED

    return not INTERPRETED


def test_cpu_without_interpreter_is_refused():
    if not _compiled_kernels():
        pytest.skip("this process runs the kernels in the interpreter")
    from megatron_rwkvx.kernels.sparse_attention import topk_chunk_attention

    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(RuntimeError, match="cannot run on device cpu"):
        topk_chunk_attention(q, q, q, chunk_size=4, top_k=2, backend="triton")


def test_autotune_switch(monkeypatch):
    """RWKVX_TRITON_AUTOTUNE=0 turns the GPU autotuning off (reproducible runs); a bad value is
    refused by name instead of being read as either."""
    if not _compiled_kernels():
        pytest.skip("the interpreter never autotunes")
    from megatron_rwkvx.kernels.triton_launch import AUTOTUNE_ENV, autotune_enabled

    monkeypatch.delenv(AUTOTUNE_ENV, raising=False)
    assert autotune_enabled()
    monkeypatch.setenv(AUTOTUNE_ENV, "0")
    assert not autotune_enabled()
    monkeypatch.setenv(AUTOTUNE_ENV, "maybe")
    with pytest.raises(ValueError, match=AUTOTUNE_ENV):
        autotune_enabled()


def test_pair_tile_must_be_a_power_of_two():
    pytest.importorskip("triton")
    from megatron_rwkvx.kernels.sparse_attention.triton_backend import topk_chunk_attention_triton

    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match="pair_tile"):
        topk_chunk_attention_triton(q, q, q, chunk_size=4, top_k=2, pair_tile=48)


def test_bad_caller_selection_is_refused():
    pytest.importorskip("triton")
    from megatron_rwkvx.kernels.sparse_attention.triton_backend import _check_selected

    q = torch.randn(1, 40, 2, 16)
    ok = torch.full((1, 2, 40, 1), -1, dtype=torch.long)
    _check_selected(ok, q, 2, 16, 0)
    future = ok.clone()
    future[0, 0, 20, 0] = 1  # position 20 is in chunk 1: chunk 1 is not a past chunk
    with pytest.raises(ValueError, match="complete past chunks"):
        _check_selected(future, q, 2, 16, 0)
    with pytest.raises(ValueError, match="top_k - 1"):
        _check_selected(ok, q, 3, 16, 0)


def test_kernels_compile_for_hopper_without_spills():
    """Compile every kernel to a sm_90 cubin (bf16, head size 64, the GPU block sizes)."""
    if not _compiled_kernels():
        pytest.skip("kernels imported under the interpreter cannot be compiled")
    from megatron_rwkvx.kernels.sparse_attention.triton_compile_check import compile_all

    results = compile_all(dtype="bf16", head_dim=64, capability=90)
    assert len(results) == 9  # the selection kernel twice: mean, and quest's keys of width 2D
    for name, info in results.items():
        assert info["spill_bytes"] == 0, f"{name} spills registers: {info}"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_autotune_configuration_compiles_for_hopper_without_spills(head_dim):
    """The GPU autotunes over these sets: a configuration that spills would only be slow, so
    none may (bf16; the pair kernels at pair tiles 64 and 128)."""
    if not _compiled_kernels():
        pytest.skip("kernels imported under the interpreter cannot be compiled")
    from megatron_rwkvx.kernels.sparse_attention.triton_compile_check import compile_tuned
    from megatron_rwkvx.kernels.sparse_attention.triton_config import KERNEL_FAMILIES, tuned_configs

    rows = compile_tuned(dtype="bf16", head_dim=head_dim, capability=90)
    sets = tuned_configs(head_dim)
    assert {r["kernel"] for r in rows} == set(KERNEL_FAMILIES)
    assert len(rows) == sum(len(c) * (2 if n.startswith("pair") else 1) for n, c in sets.items())
    spilled = [r for r in rows if r["spill_bytes"] != 0]
    assert not spilled, spilled


def test_gpu_check_script_runs_end_to_end_in_cpu_smoke_mode(tmp_path):
    """tools/gpu_check.py --cpu-smoke: every section runs (interpreter, tiny sizes: checks, timing,
    kernel breakdown, WKV-7 and sparse variant sweeps, auto's choice per length), the JSON is written,
    the summary table is printed last, and the layers timed are the project's own blocks."""
    pytest.importorskip("triton")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "smoke.json"
    env = dict(os.environ, PYTHONPATH=repo, PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)  # the script must set it itself in smoke mode
    proc = subprocess.run(
        [sys.executable, os.path.join("tools", "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    layers = res["config"]["layers"]
    assert layers["rwkv7"] == ("megatron_rwkvx.layers.rwkvx_layer.RWKVXLayer"
                               "(megatron_rwkvx.layers.rwkv7_time_mix.RWKV7TimeMix)")
    assert layers["sparse"] == layers["dense"] == ("megatron_rwkvx.layers.rwkvx_layer.RWKVXLayer"
                                                   "(megatron_rwkvx.layers.sparse_attention_block.SparseAttentionMixer)")
    notes = {r["case"]: r.get("note", "") for r in res["timing"]}
    assert notes["block_sparse"].endswith("(sparse, backend=triton)")
    assert notes["block_dense"].endswith("(dense, backend=sdpa)")
    # auto on the CPU: one candidate per operator, no probe.
    assert [(a["T"], a["operator"], a["backend"]) for a in res["auto"]] == [
        (32, "wkv7", "torch"), (32, "sparse-attention", "torch")]
    assert all(a["reason"].startswith("the only candidate on cpu") for a in res["auto"])
    assert {c["check"] for c in res["checks"]} == {"sparse_fp32_gqa", "wkv7_fp32"}
    assert all(c["passed"] for c in res["checks"]), res["checks"]
    status = {r["case"]: r["status"] for r in res["timing"]}
    assert status.pop("wkv7_fla").startswith("unavailable")
    assert set(status.values()) == {"ok"}, status
    assert res["config"]["sparse_backend"] == "triton"
    assert res["config"]["wkv_backend"] == "triton"
    assert [s["what"] for s in res["summary"]] == [
        "WKV-7 ours vs fla", "sparse attn vs SDPA", "layer pair vs dense layer"
    ]
    assert res["summary"][1]["speedup"] > 0 and res["summary"][2]["speedup"] > 0
    # The kernel breakdown: forward vs forward+backward, and a profile or its recorded error.
    assert res["breakdown"]["T"] == 64
    cases = {c["case"]: c for c in res["breakdown"]["cases"]}
    assert set(cases) == {"wkv7_ours", "wkv7_fla", "sparse_ours"}
    assert cases["wkv7_fla"]["status"].startswith("unavailable")
    for name in ("wkv7_ours", "sparse_ours"):
        case = cases[name]
        assert case["status"] == "ok", case
        assert case["fwd_ms"] > 0 and case["fwd_bwd_ms"] > 0 and "bwd_ms" in case
        if "profile" in case:
            prof = case["profile"]
            assert prof["wall_ms"] > 0 and prof["gap_ms"] >= 0 and prof["kernels"], prof
            assert all(k["calls"] >= 1 and k["ms"] >= 0 and k["name"] for k in prof["kernels"])
        else:
            assert case["profile_error"], case
    # The WKV-7 variant sweep: every chunk size timed and checked against the default call; a
    # pair mode either timed or recorded as unavailable.
    var = res["variants"]
    assert var["lengths"] == [64] and {r["T"] for r in var["rows"]} == {64}
    default = [r for r in var["rows"] if r["variant"] == "default"]
    assert len(default) == 1 and default[0]["status"] == "ok" and default[0]["ms"] > 0
    for chunk in (16, 32, 64):
        timed = [r for r in var["rows"] if r["chunk_size"] == chunk and r["status"] == "ok"]
        assert timed, var["rows"]
        for r in timed:
            assert r["ms"] > 0 and r["vs_default"] > 0 and r["correct"], r
            assert r["y_rms_vs_default"] < var["tolerance"]
        for mode in ("exact", "factored"):
            rows = [r for r in var["rows"] if (r["chunk_size"], r["pair_mode"]) == (chunk, mode)]
            assert len(rows) == 1 and rows[0]["status"] in ("ok", "unavailable (no pair_mode)"), rows
    # The sparse-attention variant sweep: autotuned, 128-pair tile and fixed blocks, same output.
    svar = res["sparse_variants"]
    assert [r["variant"] for r in svar["rows"]] == ["default", "pair_tile128", "fixed_blocks"]
    for r in svar["rows"]:
        assert r["status"] == "ok" and r["ms"] > 0 and r["vs_default"] > 0, r
        assert r["variant"] == "default" or (r["correct"] and r["out_rms_vs_default"] < svar["tolerance"]), r
    assert isinstance(res["autotune_choices"], dict)  # empty in the interpreter: nothing tunes there
    assert {"breakdown", "variants", "sparse_variants", "auto"} <= set(res["sections_s"])
    # Their tables come before the final summary table.
    text = proc.stdout
    assert (text.index("kernel breakdown at T=64") < text.index("WKV-7 variants")
            < text.index("Sparse-attention variants") < text.index("auto backend per length")
            < text.index("| comparison"))
    last = proc.stdout.strip().splitlines()
    assert last[-1].strip().startswith("32 | layer pair vs dense layer")


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(json.dumps(_interpreter_report()))
