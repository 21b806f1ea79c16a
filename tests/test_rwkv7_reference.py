"""The imported model reproduces the official RWKV-7 implementation (the `rwkv` package)."""
import os

import pytest
import torch

import megatron_rwkvx
from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.testing.checkpoints import random_official_state_dict

os.environ["RWKV_V7_ON"] = "1"
rwkv_model = pytest.importorskip("rwkv.model")


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("layers, length", [(3, 37), (4, 80)])
def test_logits_match_rwkv_package(tmp_path, tiny_kwargs, layers, length):
    cfg = RWKVXConfig(num_layers=layers, **tiny_kwargs)
    path = tmp_path / "rand.pth"
    torch.save(random_official_state_dict(cfg, seed=layers), path)
    model = megatron_rwkvx.load_pretrained(str(path))
    assert not model.training
    tokens = torch.randint(0, cfg.vocab_size, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (2, length, cfg.vocab_size)
    reference = rwkv_model.RWKV(str(path)[: -len(".pth")], "cpu fp32")
    for b in range(2):
        expected, _ = reference.forward(tokens[b].tolist(), None, full_output=True)
        assert _rel(logits[b], expected) < 1e-4


def test_stateful_continuation_matches_rwkv_package(tmp_path, tiny_kwargs):
    """The reference's recurrent (one token at a time) mode agrees with our sequence forward."""
    cfg = RWKVXConfig(num_layers=2, **tiny_kwargs)
    path = tmp_path / "rand.pth"
    torch.save(random_official_state_dict(cfg, seed=7), path)
    model = megatron_rwkvx.load_pretrained(str(path))
    tokens = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(tokens)[0]
    reference = rwkv_model.RWKV(str(path)[: -len(".pth")], "cpu fp32")
    state = None
    for t in range(tokens.shape[1]):
        out, state = reference.forward([int(tokens[0, t])], state)
        assert _rel(logits[t], out) < 1e-4
