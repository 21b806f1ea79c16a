"""Official-layout checkpoints: round trip, and clear errors for files that do not fit."""
import os

import pytest
import torch

import megatron_rwkvx
from megatron_rwkvx.checkpointing.official_format import CheckpointFormatError, export_state_dict
from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.testing.checkpoints import random_official_state_dict


@pytest.fixture
def checkpoint(tmp_path, tiny_kwargs):
    cfg = RWKVXConfig(num_layers=2, **tiny_kwargs)
    sd = random_official_state_dict(cfg, seed=5)
    path = tmp_path / "model.pth"
    torch.save(sd, path)
    return cfg, sd, path


def test_export_then_import_is_identity(checkpoint, tmp_path):
    cfg, sd, path = checkpoint
    model = megatron_rwkvx.load_pretrained(str(path))
    exported = export_state_dict(model, model.config)
    # The first block's value-residual tensors are unused by x070; the export fills them with zeros
    # so strict official loaders accept the file.
    for key in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
        assert torch.count_nonzero(exported.pop(key)) == 0
    assert exported.keys() == sd.keys()
    for key in sd:
        assert torch.equal(exported[key], sd[key]), key
    again = tmp_path / "again.pth"
    torch.save(export_state_dict(model, model.config), again)
    model2 = megatron_rwkvx.load_pretrained(str(again))
    tokens = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(tokens), model2(tokens))


def _save(sd, tmp_path, name="bad.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    return str(path)


def test_missing_key_is_named(checkpoint, tmp_path):
    _, sd, _ = checkpoint
    del sd["blocks.1.att.k_a"]
    with pytest.raises(CheckpointFormatError, match=r"missing keys.*blocks\.1\.att\.k_a"):
        megatron_rwkvx.load_pretrained(_save(sd, tmp_path))


def test_unexpected_key_is_named(checkpoint, tmp_path):
    _, sd, _ = checkpoint
    sd["blocks.1.att.time_faaaa"] = torch.zeros(3)
    with pytest.raises(CheckpointFormatError, match=r"unexpected keys.*time_faaaa"):
        megatron_rwkvx.load_pretrained(_save(sd, tmp_path))


def test_misshapen_key_is_named(checkpoint, tmp_path):
    _, sd, _ = checkpoint
    sd["blocks.1.ffn.key.weight"] = torch.zeros(7, 64)
    with pytest.raises(CheckpointFormatError, match=r"misshapen key blocks\.1\.ffn\.key\.weight: file has \(7, 64\)"):
        megatron_rwkvx.load_pretrained(_save(sd, tmp_path))


def test_other_architecture_is_recognised(tmp_path):
    sd = {"blocks.0.att.time_mix_k": torch.zeros(1, 1, 8), "emb.weight": torch.zeros(4, 8)}
    with pytest.raises(CheckpointFormatError, match="older RWKV generation"):
        megatron_rwkvx.load_pretrained(_save(sd, tmp_path))
    sd = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8)}
    with pytest.raises(CheckpointFormatError, match="Hugging Face"):
        megatron_rwkvx.load_pretrained(_save(sd, tmp_path, "hf.pth"))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_files_that_run_code_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "payload": _Exploit()}, path)
    with pytest.raises(CheckpointFormatError, match="weights-only"):
        megatron_rwkvx.load_pretrained(str(path))


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointFormatError, match="flat state dict"):
        megatron_rwkvx.load_pretrained(str(path))
    with pytest.raises(FileNotFoundError):
        megatron_rwkvx.load_pretrained(str(tmp_path / "absent.pth"))


def test_a_layer_pattern_override_loads_a_non_reference_interleaving(tmp_path, tiny_kwargs):
    """An RWKV-X file without its .json whose 2 sparse blocks sit among 3 RWKV blocks: the
    reference rule cannot interleave them, and the docstring's override must be what decides
    (before the fix, the default was computed first and failed with 'cannot interleave')."""
    from megatron_rwkvx.checkpointing.official_format import REFERENCE_RWKVX

    cfg = RWKVXConfig(layer_pattern="RARRA", **tiny_kwargs)
    path = _save(random_official_state_dict(cfg, seed=3, layout=REFERENCE_RWKVX), tmp_path, "rwkvx.pth")
    with pytest.raises(ValueError, match="interleave"):
        megatron_rwkvx.load_pretrained(path)  # no .json and no override: the rule's error stands
    model = megatron_rwkvx.load_pretrained(path, layer_pattern="RARRA")
    assert model.config.layer_pattern == "RARRA"
    with torch.no_grad():
        assert model(torch.randint(0, cfg.vocab_size, (1, 8))).shape == (1, 8, cfg.vocab_size)
