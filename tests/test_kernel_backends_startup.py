"""The trainer's start-up report of the operators' backends (training/kernel_backends.py)."""
from __future__ import annotations

import pytest
import torch

from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.kernels.registry import BackendUnavailableError, UnknownBackendError
from megatron_rwkvx.training.kernel_backends import kernel_backends, log_kernel_backends

CPU = torch.device("cpu")


def test_the_startup_log_names_each_operators_backend():
    cfg = RWKVXConfig(hidden_size=128, layer_pattern="RRRA", sparse_chunk_size=16, sparse_top_k=2)
    lines = []
    log_kernel_backends(cfg, 256, CPU, lines.append)
    assert lines == [
        "wkv7: backend torch on cpu float32 (auto: the only candidate on cpu)",
        "sparse-attention: backend torch on cpu float32 (auto: the only candidate on cpu)",
    ]


def test_forced_and_old_names_are_reported_and_only_the_operators_in_use():
    cfg = RWKVXConfig(hidden_size=128, layer_pattern="RRRR", wkv_backend="naive", bf16=True,
                      params_dtype=torch.bfloat16)
    (choice,) = kernel_backends(cfg, 64, CPU)
    assert choice.line() == "wkv7: backend reference on cpu bfloat16 (requested 'naive': forced by the user)"


def test_a_backend_that_cannot_run_or_does_not_exist_stops_the_start():
    with pytest.raises(BackendUnavailableError, match="--wkv-backend triton: wkv7: backend 'triton' (is unavailable|cannot run on device cpu)"):
        kernel_backends(RWKVXConfig(hidden_size=128, layer_pattern="RA", wkv_backend="triton"), 64, CPU)
    with pytest.raises(BackendUnavailableError, match="--sparse-attention-backend triton: sparse-attention: backend 'triton'"):
        kernel_backends(RWKVXConfig(hidden_size=128, layer_pattern="RA", sparse_attention_backend="triton"), 64, CPU)
    with pytest.raises(UnknownBackendError, match="sparse-attention: unknown backend 'flash'"):
        kernel_backends(RWKVXConfig(hidden_size=128, layer_pattern="RA", sparse_attention_backend="flash"), 64, CPU)


# ------------------------------------------------------------------ one choice for all ranks


class _Clock:
    """The probe's clock, advanced only by the fake backends' declared costs."""

    now = 0.0

    def __call__(self):
        return self.now


def _costing(fn, clock, seconds):
    def run(*args, **kwargs):
        clock.now += seconds
        return fn(*args, **kwargs)
    return run


def _auto_on_two_ranks(rank, world, broken_on_rank_one):
    """Each rank's probe finds a different fastest backend ('fast_on_0' on rank 0, 'fast_on_1'
    on rank 1), as timing noise or a busier device could; the job must still run one."""
    from megatron_rwkvx.kernels import registry
    from megatron_rwkvx.kernels.sparse_attention import SPARSE_ATTENTION
    from megatron_rwkvx.kernels.sparse_attention.chunked import topk_chunk_attention_torch
    from megatron_rwkvx.kernels.wkv7 import WKV7
    from megatron_rwkvx.kernels.wkv7.chunked import wkv7_chunked

    clock = _Clock()
    registry._now = clock
    for op, fn in ((WKV7, wkv7_chunked), (SPARSE_ATTENTION, topk_chunk_attention_torch)):
        op.register("torch", _costing(fn, clock, 0.05))
        for name in ("fast_on_0", "fast_on_1"):
            op.register(name, _costing(fn, clock, 0.001 if name == f"fast_on_{rank}" else 0.01))
        if broken_on_rank_one and rank == 1:  # a device where rank 0's choice cannot run
            op.register("fast_on_0", fn, can_run=lambda x: False)
    cfg = RWKVXConfig(hidden_size=64, head_size=16, layer_pattern="RA", sparse_chunk_size=8, sparse_top_k=2)
    try:
        choices = kernel_backends(cfg, 32, CPU)
    except BackendUnavailableError as err:
        return f"refused: {err}"
    x = torch.zeros(1, 32, 4, 16)
    return [(c.backend, c.reason, op.resolve("auto", x) is op._backends[c.backend].fn)
            for c, op in zip(choices, (WKV7, SPARSE_ATTENTION))]


@pytest.mark.distributed
def test_auto_probes_on_rank_zero_and_every_rank_runs_its_choice():
    from megatron_rwkvx.testing.distributed import run_distributed

    zero, one = run_distributed(_auto_on_two_ranks, 2, False)
    assert [c[0] for c in zero] == [c[0] for c in one] == ["fast_on_0", "fast_on_0"], (zero, one)
    assert all(c[2] for c in zero + one)  # the layers' auto runs the agreed backend
    for c in zero + one:
        assert c[1].startswith("fastest exact at ") and c[1].endswith("decided on rank 0 for all 2 ranks")
    assert [c[1] for c in zero] == [c[1] for c in one]  # rank 0's timings, logged by any rank


@pytest.mark.distributed
def test_a_rank_that_cannot_run_rank_zeros_choice_stops_with_the_fix():
    from megatron_rwkvx.testing.distributed import run_distributed

    zero, one = run_distributed(_auto_on_two_ranks, 2, True)
    assert zero == one, (zero, one)  # both ranks stop, with one message
    assert one.startswith("refused: --wkv-backend auto: rank 1: auto chose 'fast_on_0' elsewhere in this job")
    assert one.endswith("name a backend that every rank can run"), one
