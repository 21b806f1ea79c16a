"""attention_mode="dense": the dense-attention baseline of the same size. Equal to the sparse model
where top-k chunk attention is dense causal attention (T <= chunk x top_k), different beyond; refused
where it cannot work (context parallelism, the incremental decoder)."""
import pytest
import torch

from megatron_rwkvx.checkpointing.official_format import import_state_dict
from megatron_rwkvx.config import ConfigError, RWKVXConfig
from megatron_rwkvx.errors import UsageError
from megatron_rwkvx.inference.state import new_state
from megatron_rwkvx.models.rwkvx_model import RWKVXModel
from megatron_rwkvx.pretrained import prepare_runtime
from megatron_rwkvx.testing.checkpoints import random_official_state_dict
from megatron_rwkvx.training.arguments import ArgumentError, parse_args
from megatron_rwkvx.training.kernel_backends import kernel_backends
from megatron_rwkvx.training.metrics import model_flops_per_token

from conftest import TINY

CHUNK, TOP_K = 8, 2
CFG = dict(TINY, layer_pattern="RARA", sparse_chunk_size=CHUNK, sparse_top_k=TOP_K)


def _model(mode, sd):
    prepare_runtime(torch.device("cpu"))
    cfg = RWKVXConfig(use_cpu_initialization=True, attention_mode=mode, **CFG)
    model = RWKVXModel(cfg, parallel_output=False)
    import_state_dict(model, sd, cfg)
    return model


@pytest.fixture(scope="module")
def models():
    # Random weights everywhere (the sparse blocks' output projections too, unlike a fresh init).
    sd = random_official_state_dict(RWKVXConfig(**CFG), seed=3)
    return _model("sparse", sd), _model("dense", sd)


def _logits_and_grads(model, tokens):
    model.zero_grad()
    logits = model(tokens)
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_dense_equals_sparse_when_every_query_sees_all_its_past(models):
    sparse, dense = models
    tokens = torch.randint(0, TINY["vocab_size"], (2, CHUNK * TOP_K), generator=torch.Generator().manual_seed(1))
    want, want_grads = _logits_and_grads(sparse, tokens)
    got, got_grads = _logits_and_grads(dense, tokens)
    assert _rel(got, want) < 1e-5
    for name, g in want_grads.items():
        assert _rel(got_grads[name], g) < 1e-5, name


def test_dense_differs_from_sparse_once_chunks_are_left_out(models):
    sparse, dense = models
    tokens = torch.randint(0, TINY["vocab_size"], (1, 6 * CHUNK), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = sparse(tokens), dense(tokens)
    # The first chunk x top_k positions see the same keys either way; later ones do not.
    head = CHUNK * TOP_K
    assert _rel(got[:, :head], want[:, :head]) < 1e-5
    assert _rel(got[:, head:], want[:, head:]) > 1e-3


def test_dense_is_refused_with_context_parallelism_and_by_the_decoder(models):
    with pytest.raises(ConfigError, match="attention_mode dense.*context_parallel_size 1"):
        RWKVXConfig(attention_mode="dense", context_parallel_size=2, **CFG)
    with pytest.raises(ConfigError, match="attention_mode 'sideways' is unknown"):
        RWKVXConfig(attention_mode="sideways", **CFG)
    argv = ["--mock-data", "--layer-pattern", "RA", "--hidden-size", "64", "--seq-length", "64",
            "--train-iters", "1", "--context-parallel-size", "2", "--attention-mode", "dense"]
    with pytest.raises(ArgumentError, match="--attention-mode dense.*--context-parallel-size 1"):
        parse_args(argv, world_size=2)
    assert parse_args(argv[:-4], world_size=1).attention_mode is None  # the start checkpoint's, else sparse
    with pytest.raises(UsageError, match="incremental decoder.*attention_mode 'sparse'"):
        new_state(models[1], batch_size=1)


def test_dense_flops_and_start_up_line():
    sparse = RWKVXConfig(**CFG)
    dense = RWKVXConfig(attention_mode="dense", **CFG)
    window = CHUNK * TOP_K
    assert model_flops_per_token(dense, window) == model_flops_per_token(sparse, window)
    # Beyond the window the dense blocks attend T/2 keys on average, the sparse ones fewer.
    extra = model_flops_per_token(dense, 8 * window) - model_flops_per_token(sparse, 8 * window)
    attended_sparse = window - window * window / (2 * 8 * window)
    assert extra == pytest.approx(2 * 2 * 2 * CFG["hidden_size"] * (4 * window - attended_sparse))
    lines = [c.line() for c in kernel_backends(dense, 64, torch.device("cpu"))]
    assert lines[-1].startswith("dense-attention: backend sdpa on cpu float32 (requested 'dense'")
    assert not any(line.startswith("sparse-attention") for line in lines)
