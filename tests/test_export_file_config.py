"""An exported .pth keeps what its tensors cannot tell (the position of the sparse blocks, grouped-
query heads, chunk size, top-k) in ``<file>.json``, and ``load_pretrained`` rebuilds the same model."""
import json
import os
import sys

import pytest
import torch

import megatron_rwkvx
from megatron_rwkvx.pretrained import save_pretrained_as_megatron
from megatron_rwkvx.checkpointing.official_format import REFERENCE_RWKVX, CheckpointFormatError
from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.pretrained import file_config_path
from megatron_rwkvx.testing.checkpoints import random_official_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not the reference interleaving (that would be RRRA), grouped-query heads, small chunks.
ARCH = dict(layer_pattern="RARR", num_query_groups=2, sparse_chunk_size=8, sparse_top_k=2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import export_checkpoint
    finally:
        sys.path.pop(0)
    tmp = tmp_path_factory.mktemp("export")
    cfg = RWKVXConfig(hidden_size=64, head_size=16, vocab_size=300, **ARCH)
    sd = random_official_state_dict(cfg, seed=3, layout=REFERENCE_RWKVX)
    save_pretrained_as_megatron(sd, str(tmp / "ckpt"), **ARCH)
    out = tmp / "model.pth"
    assert export_checkpoint.main(["--load", str(tmp / "ckpt"), "--output", str(out), "--dtype", "fp32"]) == 0
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def test_the_config_file_is_written_beside_the_pth(exported):
    saved = json.loads(open(file_config_path(str(exported))).read())
    for k, v in ARCH.items():
        assert saved[k] == v


def test_load_pretrained_rebuilds_the_exported_model(exported):
    model = megatron_rwkvx.load_pretrained(str(exported))
    for k, v in ARCH.items():
        assert getattr(model.config, k) == v
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    # The same model described by hand, from the .pth alone.
    moved = str(exported) + ".moved"
    os.rename(file_config_path(str(exported)), moved)
    try:
        by_hand = megatron_rwkvx.load_pretrained(str(exported), **ARCH)
        with pytest.raises(CheckpointFormatError):
            # Without the file, the reference interleaving and full heads: the GQA weights do not fit.
            megatron_rwkvx.load_pretrained(str(exported))
    finally:
        os.rename(moved, file_config_path(str(exported)))
    assert torch.equal(_logits(model, ids), _logits(by_hand, ids))


def test_a_config_file_of_another_export_is_refused(exported, tmp_path):
    other = tmp_path / "other.pth"
    other.write_bytes(exported.read_bytes())
    saved = json.loads(open(file_config_path(str(exported))).read())
    saved["layer_pattern"] = "RRARA"
    saved["hidden_size"] = 128
    with open(file_config_path(str(other)), "w") as f:
        json.dump(saved, f)
    with pytest.raises(CheckpointFormatError, match="hidden_size.*layer_pattern|does not describe its weights"):
        megatron_rwkvx.load_pretrained(str(other))
    with open(file_config_path(str(other)), "w") as f:
        json.dump({"layer_pattern": "RARR"}, f)  # not ours: refused rather than half-read
    with pytest.raises(CheckpointFormatError, match="not a megatron-rwkvx file config"):
        megatron_rwkvx.load_pretrained(str(other))


def test_init_from_an_exported_pth_takes_its_pattern_and_heads(exported):
    from megatron_rwkvx.training.model_builder import model_shape_from_init

    shape = model_shape_from_init(str(exported))
    assert shape["layer_pattern"] == "RARR" and shape["num_query_groups"] == 2
    assert "sparse_chunk_size" not in shape and "sparse_top_k" not in shape  # chosen per stage
