"""The one kernel registry (kernels/registry.py) behind wkv7 and topk_chunk_attention: role names
and old aliases, plug-in modules that fail loudly, and ``auto``'s choice of the fastest exact
backend (fake slower, faster, inexact and failing backends on the CPU; a simulated GPU)."""
from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

from megatron_rwkvx.errors import UsageError
from megatron_rwkvx.kernels import registry
from megatron_rwkvx.kernels.registry import (
    BackendUnavailableError,
    Plugin,
    UnknownBackendError,
)
from megatron_rwkvx.kernels.sparse_attention import SPARSE_ATTENTION, topk_chunk_attention
from megatron_rwkvx.kernels.sparse_attention.chunked import topk_chunk_attention_torch
from megatron_rwkvx.kernels.wkv7 import WKV7, wkv7, wkv7_chunked, wkv7_naive
from megatron_rwkvx.kernels.wkv7.probe import model_like_inputs


@pytest.fixture
def isolated(monkeypatch):
    """Copies of both operators' mutable state, restored after the test."""
    for op in (WKV7, SPARSE_ATTENTION):
        for attr in ("_backends", "_load_errors", "_auto", "_auto_fn", "plugins"):
            monkeypatch.setattr(op, attr, dict(getattr(op, attr)))
        monkeypatch.setattr(op, "_loaded", set(op._loaded))
    return monkeypatch


def _wkv_inputs(dtype=torch.float32, T=12):
    return model_like_inputs(1, T, 2, 8, dtype=dtype, seed=3)


def _gpu_like(shape=(1, 64, 2, 8), dtype=torch.bfloat16):
    """What the registry reads of a CUDA tensor, without a GPU."""
    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=dtype, shape=shape)


# ------------------------------------------------------------------ names


def test_role_names_and_old_aliases_reach_the_same_backends():
    r = _wkv_inputs()[0]
    assert WKV7.resolve("torch", r) is WKV7.resolve("chunked", r) is wkv7_chunked
    assert WKV7.resolve("reference", r) is WKV7.resolve("naive", r) is wkv7_naive
    assert SPARSE_ATTENTION.resolve("torch", r) is topk_chunk_attention_torch
    for op in (WKV7, SPARSE_ATTENTION):
        assert op.choices()[0] == "auto" and {"reference", "torch", "triton"} <= set(op.choices())
    assert "fla" in WKV7.choices()


def test_unknown_names_are_refused_with_the_roles_and_the_old_names():
    inputs = _wkv_inputs()
    with pytest.raises(UnknownBackendError, match=r"wkv7: unknown backend 'cuda'; choose one of \['auto', "
                       r"'fla', 'reference', 'torch', 'triton'\] \(old names: 'chunked' = 'torch', "
                       r"'naive' = 'reference'\)"):
        wkv7(*inputs, backend="cuda")
    with pytest.raises(UsageError, match="sparse-attention: unknown backend 'chunked'"):
        topk_chunk_attention(*inputs[:3], chunk_size=4, backend="chunked")
    with pytest.raises(TypeError, match="backend must be a string"):
        WKV7.canonical(None)
    with pytest.raises(ValueError, match="reserved or an alias"):
        WKV7.register("chunked", wkv7_chunked)
    with pytest.raises(ValueError, match="reserved or an alias"):
        WKV7.register("auto", wkv7_chunked)


# ------------------------------------------------------------------ plug-ins


def _plugin_module(tmp_path, name, text, monkeypatch):
    (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_plugins_register_on_first_need_and_broken_ones_are_named(isolated, tmp_path):
    ok = _plugin_module(tmp_path, "fake_plugin_ok", (
        "from megatron_rwkvx.kernels.sparse_attention import register_backend\n"
        "from megatron_rwkvx.kernels.sparse_attention.chunked import topk_chunk_attention_torch\n"
        "register_backend('fast_kernel', topk_chunk_attention_torch)\n"), isolated)
    broken = _plugin_module(tmp_path, "fake_plugin_broken", "raise ImportError('no GPU toolchain here')\n", isolated)
    silent = _plugin_module(tmp_path, "fake_plugin_silent", "x = 1\n", isolated)
    for name, module in (("fast_kernel", ok), ("broken_kernel", broken), ("silent_kernel", silent)):
        SPARSE_ATTENTION.plugins[name] = Plugin(name, module)
    q = torch.randn(1, 20, 2, 8)
    got = topk_chunk_attention(q, q, q, chunk_size=8, backend="fast_kernel")
    assert torch.equal(got, topk_chunk_attention(q, q, q, chunk_size=8, backend="torch"))
    with pytest.raises(BackendUnavailableError, match=r"backend 'broken_kernel' is unavailable "
                       r"\(ImportError: no GPU toolchain here\)"):
        topk_chunk_attention(q, q, q, chunk_size=8, backend="broken_kernel")
    with pytest.raises(BackendUnavailableError, match="fake_plugin_silent imported but did not register"):
        topk_chunk_attention(q, q, q, chunk_size=8, backend="silent_kernel")
    assert "fast_kernel" in SPARSE_ATTENTION.available(q)


def test_a_failing_triton_import_on_a_gpu_is_reported_not_swallowed(isolated, tmp_path):
    broken = _plugin_module(tmp_path, "fake_triton_broken",
                            "raise ImportError('libcuda.so.1: cannot open shared object file')\n", isolated)
    WKV7.plugins["triton"] = Plugin("triton", broken)
    WKV7.unregister("triton")  # when the real kernels were imported by an earlier test
    WKV7._loaded.discard("triton")
    x = _gpu_like()
    with pytest.warns(RuntimeWarning, match=r"wkv7: on cuda:0 backend 'triton' failed to import "
                      r"\(ImportError: libcuda.so.1.*\); running 'torch' instead"):
        choice = WKV7.report("auto", x)
    assert choice.backend == "torch"
    assert "WARNING: backend 'triton' failed to import (ImportError: libcuda.so.1" in choice.reason
    assert "WARNING" in choice.line() and "wkv7: backend torch on cuda:0 bfloat16" in choice.line()
    # Forcing it fails with the same import error, as --wkv-backend triton does.
    with pytest.raises(BackendUnavailableError, match=r"backend 'triton' is unavailable \(ImportError: "
                       r"libcuda.so.1: cannot open shared object file\)"):
        WKV7.resolve("triton", x)


def test_a_missing_optional_library_is_noted_quietly(isolated):
    # fla is not installed in CI; on a GPU that is a note, not a warning, and forcing it says how to install it.
    if "fla" in WKV7.available():
        pytest.skip("fla is installed here")
    x = _gpu_like()
    WKV7.plugins.pop("triton")  # only the optional library is left to fail
    WKV7.unregister("triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choice = WKV7.report("auto", x)
    assert choice.backend == "torch" and "fla not installed" in choice.reason
    with pytest.raises(BackendUnavailableError, match=r"'fla' is not installed \(ModuleNotFoundError.*\); "
                       "pip install flash-linear-attention"):
        WKV7.resolve("fla", x)


# ------------------------------------------------------------------ auto


class VirtualClock:
    """The probe's clock: only the fake backends' declared costs advance it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(isolated):
    c = VirtualClock()
    isolated.setattr(registry, "_now", c)
    return c


def _slowed(fn, clock, seconds, calls=None, name=None):
    def run(*args, **kwargs):
        if calls is not None:
            calls.append(name)
        clock.now += seconds
        return fn(*args, **kwargs)
    return run


def _inexact(*args):
    y, state = wkv7_chunked(*args)
    return y * 1.1, state


def _failing(*args):
    raise RuntimeError("kernel launch failed")


def test_auto_on_the_cpu_with_one_candidate_never_probes(isolated):
    isolated.setattr(WKV7, "probe", lambda *a: pytest.fail("probed with a single candidate"))
    r = _wkv_inputs()[0]
    choice = WKV7.report("auto", r)
    assert choice.backend == "torch" and choice.reason.startswith("the only candidate on cpu")
    assert WKV7.resolve("auto", r) is wkv7_chunked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_picks_the_fastest_exact_backend_and_caches_it(clock, dtype):
    calls = []
    WKV7.register("torch", _slowed(wkv7_chunked, clock, 0.02, calls, "torch"))
    WKV7.register("slow", _slowed(wkv7_chunked, clock, 0.06, calls, "slow"))
    WKV7.register("fast", _slowed(wkv7_chunked, clock, 0.005, calls, "fast"))
    WKV7.register("wrong", _inexact)  # fastest of all, but not exact
    WKV7.register("broken", _failing)
    inputs = _wkv_inputs(dtype)
    with torch.inference_mode():  # the first call may come from generation: the probe still runs
        y, _ = wkv7(*inputs)  # auto
    choice = WKV7.report("auto", inputs[0])
    assert choice.backend == "fast", choice.reason
    assert set(choice.timings_ms) == {"torch", "slow", "fast"}
    assert choice.timings_ms == pytest.approx({"fast": 5.0, "torch": 20.0, "slow": 60.0})
    assert "refused: " in choice.reason and "wrong inexact (rms " in choice.reason
    assert "broken failed (RuntimeError: kernel launch failed)" in choice.reason
    assert choice.reason.startswith("fastest exact at B=1 T=12 H=2 N=8 fwd+bwd: fast ")
    # Cached per device and dtype: later calls run the choice without probing again.
    calls.clear()
    wkv7(*inputs)
    wkv7(*inputs)
    assert calls == ["fast", "fast"]
    assert torch.equal(y, wkv7(*inputs, backend="torch")[0])
    # A user can always force one, even an inexact one.
    assert torch.equal(wkv7(*inputs, backend="wrong")[0], wkv7_chunked(*inputs, None, None)[0].mul(1.1).to(dtype))


def test_auto_refuses_when_no_candidate_is_exact(isolated):
    WKV7.register("torch", _inexact)  # a broken reference path makes every other candidate inexact
    WKV7.register("other", wkv7_chunked)
    isolated.setattr(registry, "tolerance", lambda dtype: 0.0)
    with pytest.raises(BackendUnavailableError, match="no backend passed the exactness probe on cpu"):
        WKV7.report("auto", _wkv_inputs()[0])


def test_auto_picks_the_fastest_exact_sparse_attention_backend(clock):
    SPARSE_ATTENTION.register("torch", _slowed(topk_chunk_attention_torch, clock, 0.02))
    SPARSE_ATTENTION.register("fast", topk_chunk_attention_torch)
    q, k, v = (torch.randn(1, 40, 4, 8) for _ in range(3))
    out = topk_chunk_attention(q, k[:, :, :2], v[:, :, :2], chunk_size=4, top_k=2)
    choice = SPARSE_ATTENTION.report("auto", q)
    assert choice.backend == "fast" and "B=1 T=12 Hq=4 Hkv=2 D=8 chunk=4 top_k=2" in choice.reason
    assert torch.equal(out, topk_chunk_attention(q, k[:, :, :2], v[:, :, :2], chunk_size=4, top_k=2, backend="torch"))


# ------------------------------------------------------------------ fla's convention


def _fla_documented_recurrence(q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False):
    """fla's DPLR recurrence as its docs and naive reference state it, in its own layout: inputs
    [B, T, H, K], state [B, H, K, V], ``S_t = exp(gk_t) * S_{t-1} + k_t v_t^T + b_t (a_t^T S_{t-1})``,
    ``o_t = S_t^T (scale * q_t)``."""
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.clone()
    out = []
    for t in range(T):
        qt, kt, vt, at, bt, gt = (x[:, t].float() for x in (q, k, v, a, b, gk))
        S = S * gt.exp()[..., None] + kt[..., None] * vt[..., None, :] + bt[..., None] * (at[..., None] * S).sum(-2, keepdim=True)
        out.append(torch.einsum("bhk,bhkv->bhv", qt * (K ** -0.5 if scale is None else scale), S))
    return torch.stack(out, 1).to(q.dtype), S if output_final_state else None


def test_the_fla_adapter_maps_our_convention_onto_flas(isolated):
    """``a = -kk``, ``b = kk * rate`` pass unchanged, the log decay goes in as ``gk``, scale 1, the
    state transposed in and out: the adapter on fla's documented recurrence equals our reference."""
    fla_op = types.ModuleType("fla.ops.generalized_delta_rule")
    fla_op.chunk_dplr_delta_rule = _fla_documented_recurrence
    for name, module in (("fla", types.ModuleType("fla")), ("fla.ops", types.ModuleType("fla.ops")),
                         ("fla.ops.generalized_delta_rule", fla_op)):
        isolated.setitem(sys.modules, name, module)
    adapter = "megatron_rwkvx.kernels.wkv7.fla_backend"
    isolated.delitem(sys.modules, adapter, raising=False)
    WKV7._loaded.discard("fla")
    WKV7._load_errors.pop("fla", None)
    try:
        assert "fla" in WKV7.available()  # the plug-in imported (on the fake) and registered itself
        inputs = _wkv_inputs(T=9)
        state = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(5))
        y, final = WKV7._backends["fla"].fn(*inputs, state, None)
    finally:  # the adapter bound to the fake must not serve later imports
        sys.modules.pop(adapter, None)
    y_ref, final_ref = wkv7_naive(*inputs, state, None)
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(final, final_ref, atol=1e-5)
