"""Shared fixtures: a tiny model configuration and a random official-layout checkpoint."""
from __future__ import annotations

import os

import pytest
import torch

# The rwkv package reads this at import time to expose RWKV_x070 (our numerics reference).
os.environ.setdefault("RWKV_V7_ON", "1")


TINY = dict(
    hidden_size=64,
    head_size=16,
    vocab_size=128,
    decay_lora_dim=16,
    a_lora_dim=16,
    v_lora_dim=16,
    gate_lora_dim=16,
    ffn_hidden_size=256,
)


@pytest.fixture
def tiny_kwargs():
    return dict(TINY)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests compare numbers at 1e-5; keep intra-op threading fixed so reductions are repeatable.
    torch.set_num_threads(2)
    yield


@pytest.fixture
def one_thread():
    """Decoding is many tiny ops; one thread avoids spin-waiting on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_tiny_world_rwkvx(path, seed: int, pattern: str = "RA"):
    """A random tiny RWKV-X ``.pth`` (reference layout) with the World tokenizer's vocabulary."""
    from megatron_rwkvx.checkpointing.official_format import REFERENCE_RWKVX
    from megatron_rwkvx.config import RWKVXConfig
    from megatron_rwkvx.testing.checkpoints import random_official_state_dict

    cfg = RWKVXConfig(layer_pattern=pattern, **{**TINY, "vocab_size": 65536})
    torch.save(random_official_state_dict(cfg, seed=seed, layout=REFERENCE_RWKVX), path)
    return path
