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
