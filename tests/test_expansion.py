"""Block expansion RWKV-7 -> RWKV-X, the RWKV-X reference format, and megatron checkpoints."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megatron_rwkvx
from megatron_rwkvx.checkpointing.expansion import expand_rwkv7_state_dict
from megatron_rwkvx.checkpointing.official_format import REFERENCE_RWKVX, export_state_dict
from megatron_rwkvx.config import ConfigError, RWKVXConfig
from megatron_rwkvx.testing.checkpoints import random_official_state_dict

ROOT = Path(__file__).resolve().parents[1]
SPARSE = dict(sparse_chunk_size=8, sparse_top_k=2)  # T=40: 5 chunks, the selection matters


@pytest.fixture
def base_path(tmp_path, tiny_kwargs):
    cfg = RWKVXConfig(num_layers=4, **tiny_kwargs)
    path = tmp_path / "base.pth"
    torch.save(random_official_state_dict(cfg, seed=2), path)
    return path


def _convert(*args):
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_rwkv7_to_rwkvx.py"), *map(str, args)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_zero_init_expansion_reproduces_base(base_path, tmp_path):
    out = tmp_path / "x.pth"
    info = _convert("--input", base_path, "--output", out, "--num-sparse-blocks", 2)
    assert info["pattern"] == "RRARRA"
    base = megatron_rwkvx.load_pretrained(str(base_path))
    hybrid = megatron_rwkvx.load_pretrained(str(out), **SPARSE)
    assert hybrid.config.layer_pattern == "RRARRA"
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = base(tokens), hybrid(tokens)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5


def test_new_blocks_draw_query_and_key_at_the_attention_scale(base_path):
    # Finding 16 of docs/retrieval_study.md: the scale of the query/key draw decides whether the
    # toy's lookup forms. The expansion and a model built from scratch must draw at the same one.
    from megatron_rwkvx.config import SPARSE_QK_INIT_SCALE, SPARSE_VALUE_INIT_SCALE
    from megatron_rwkvx.models.rwkvx_model import RWKVXModel

    def std_ratio(weight, scale):  # U(+-scale/sqrt(fan_in)) has std scale/sqrt(3 fan_in)
        return weight.float().std().item() / (scale / (3 * weight.shape[1]) ** 0.5)

    expanded, _ = expand_rwkv7_state_dict(torch.load(base_path, weights_only=True), num_sparse_blocks=2)
    cfg = RWKVXConfig(num_layers=6, layer_pattern="RRARRA", hidden_size=128, head_size=32, vocab_size=64,
                      use_cpu_initialization=True, params_dtype=torch.float32)
    mixer = RWKVXModel(cfg, parallel_output=False).decoder.layers[2].mixer
    drawn = {
        "expansion": [expanded["moba.0.att.receptance.weight"], expanded["moba.0.att.key.weight"],
                      expanded["moba.0.att.value.weight"]],
        "model": [mixer.query.weight, mixer.key.weight, mixer.value.weight],
    }
    for where, (query, key, value) in drawn.items():
        for name, weight, scale in (("query", query, SPARSE_QK_INIT_SCALE), ("key", key, SPARSE_QK_INIT_SCALE),
                                    ("value", value, SPARSE_VALUE_INIT_SCALE)):
            assert abs(std_ratio(weight, scale) - 1) < 0.1, (where, name, std_ratio(weight, scale))
    # equal scales would let a query drawn at the value's scale pass
    assert SPARSE_QK_INIT_SCALE != SPARSE_VALUE_INIT_SCALE


def test_explicit_pattern_and_bad_patterns(base_path):
    sd = torch.load(base_path, weights_only=True)
    expanded, pattern = expand_rwkv7_state_dict(sd, pattern="RARRRA")
    assert pattern == "RARRRA" and "moba.1.att.key.weight" in expanded
    with pytest.raises(ConfigError, match="R blocks"):
        expand_rwkv7_state_dict(sd, pattern="RRA")
    with pytest.raises(ConfigError, match="multiple"):
        expand_rwkv7_state_dict(sd, num_sparse_blocks=3)
    with pytest.raises(ConfigError, match="before any RWKV block"):
        expand_rwkv7_state_dict(sd, pattern="ARRRR", init="copy")


def test_copy_init_loads_and_trains(base_path, tmp_path):
    out = tmp_path / "copy.pth"
    _convert("--input", base_path, "--output", out, "--num-sparse-blocks", 2, "--init", "copy")
    sd = torch.load(out, weights_only=True)
    assert torch.equal(sd["moba.0.att.output.weight"], sd["rwkv.blocks.1.att.output.weight"])
    model = megatron_rwkvx.load_pretrained(str(out), **SPARSE)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 128, (2, 41), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9


def test_rwkvx_export_then_import_is_identity(base_path, tmp_path):
    out = tmp_path / "x.pth"
    _convert("--input", base_path, "--output", out, "--pattern", "RRARRA")
    original = torch.load(out, weights_only=True)
    model = megatron_rwkvx.load_pretrained(str(out))
    exported = export_state_dict(model, model.config, REFERENCE_RWKVX)
    for key in ("rwkv.blocks.0.att.v0", "rwkv.blocks.0.att.v1", "rwkv.blocks.0.att.v2"):
        exported.pop(key)
    assert exported.keys() == original.keys()
    for key in original:
        assert torch.equal(exported[key], original[key]), key


def test_existing_output_is_refused(base_path, tmp_path):
    out = tmp_path / "exists.pth"
    out.write_text("keep me")
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_rwkv7_to_rwkvx.py"), "--input", str(base_path),
         "--output", str(out), "--num-sparse-blocks", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert out.read_text() == "keep me"


def _logits_from_megatron_checkpoint(rank, world, directory, tokens):
    from megatron_rwkvx.checkpointing.megatron_format import load_model_checkpoint, read_model_config
    from megatron_rwkvx.models.rwkvx_model import RWKVXModel
    from megatron_rwkvx.testing.distributed import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=world)
    arch = read_model_config(directory)
    arch.update(SPARSE)
    cfg = RWKVXConfig(tensor_model_parallel_size=world, use_cpu_initialization=True, **arch)
    model = RWKVXModel(cfg, parallel_output=False)
    assert load_model_checkpoint(model, cfg, directory) == 0
    with torch.no_grad():
        logits = model(tokens)  # every rank takes part in the collectives
    return logits if rank == 0 else None


@pytest.mark.distributed
def test_megatron_output_loads_at_another_tensor_parallel_size(base_path, tmp_path):
    from megatron_rwkvx.testing.distributed import run_distributed

    pth, directory = tmp_path / "x.pth", tmp_path / "megatron"
    _convert("--input", base_path, "--output", pth, "--num-sparse-blocks", 2, "--init", "copy")
    _convert("--input", base_path, "--output", directory, "--num-sparse-blocks", 2, "--init", "copy",
             "--output-format", "megatron")
    tokens = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(4))
    expected = megatron_rwkvx.load_pretrained(str(pth), **SPARSE)(tokens).detach()
    got = run_distributed(_logits_from_megatron_checkpoint, 2, str(directory), tokens)[0]
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
