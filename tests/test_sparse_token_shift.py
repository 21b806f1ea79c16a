"""sparse_token_shift: the sparse blocks' query/key/value inputs mix in the previous token. It is an
architecture field (saved, checked on resume and --init-from, read off a file's keys); expansion
adds the mixes; decoding and the parallel layouts are covered by test_inference_decode.py and
test_parallel_layouts.py."""
from __future__ import annotations

import pytest
import torch

import megatron_rwkvx
from megatron_rwkvx.checkpointing.expansion import expand_rwkv7_state_dict
from megatron_rwkvx.checkpointing.megatron_format import (
    load_model_checkpoint,
    read_model_config,
    save_model_checkpoint,
)
from megatron_rwkvx.checkpointing.official_format import (
    REFERENCE_RWKVX,
    CheckpointFormatError,
    export_state_dict,
    import_state_dict,
)
from megatron_rwkvx.config import SPARSE_SHIFT_INIT, RWKVXConfig
from megatron_rwkvx.models.rwkvx_model import RWKVXModel
from megatron_rwkvx.pretrained import prepare_runtime
from megatron_rwkvx.testing.checkpoints import random_official_state_dict
from megatron_rwkvx.training.arguments import ArgumentError, parse_args
from megatron_rwkvx.training.model_builder import build_config
from megatron_rwkvx.training.resume import _inspect_directories

from conftest import TINY

CFG = dict(TINY, layer_pattern="RARA", sparse_chunk_size=8, sparse_top_k=2)
IDS = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
TRAIN = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--seq-length", "48",
         "--micro-batch-size", "1", "--global-batch-size", "1", "--device", "cpu", "--lr", "1e-3",
         "--train-iters", "2"]
SHAPE = ["--layer-pattern", "RARA", "--hidden-size", "64", "--head-size", "16",
         "--sparse-chunk-size", "8", "--sparse-top-k", "2"]


def _model(shift: bool, sd=None):
    prepare_runtime(torch.device("cpu"))
    cfg = RWKVXConfig(use_cpu_initialization=True, sparse_token_shift=shift, **CFG)
    model = RWKVXModel(cfg, parallel_output=False)
    if sd is not None:
        import_state_dict(model, sd, cfg)
    return model.eval()


def _sparse_mixers(model):
    return [layer.mixer for layer in model.decoder.layers if layer.symbol == "A"]


def test_the_projections_read_the_shifted_input():
    model = _model(True)
    mixer = _sparse_mixers(model)[0]
    x = torch.randn(12, 2, TINY["hidden_size"], generator=torch.Generator().manual_seed(0))
    prev = torch.cat([torch.zeros_like(x[:1]), x[:-1]])
    with torch.no_grad():
        for name in ("x_r", "x_k", "x_v"):
            getattr(mixer, name).copy_(torch.rand(TINY["hidden_size"], generator=torch.Generator().manual_seed(1)))
        q, k, v = mixer.project(x)
        for proj, got, mix in ((mixer.query, q, mixer.x_r), (mixer.key, k, mixer.x_k), (mixer.value, v, mixer.x_v)):
            want = proj(x + (prev - x) * mix)[0].view(got.shape)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        # A given previous token (decoding) replaces the zeros before the first position.
        before = torch.randn(2, TINY["hidden_size"])
        q1, _, _ = mixer.project(x[:1], before)
        torch.testing.assert_close(q1[0], mixer.query(x[0] + (before - x[0]) * mixer.x_r)[0].view(q1[0].shape))


def test_mixes_at_zero_compute_the_reference_block():
    sd_shift = random_official_state_dict(RWKVXConfig(sparse_token_shift=True, **CFG), seed=4)
    shifted = _model(True, sd_shift)
    reference = _model(False, _without_sparse_mixes(sd_shift))
    with torch.no_grad():
        assert not torch.allclose(shifted(IDS), reference(IDS), atol=1e-4)  # the mixes matter here
        for mixer in _sparse_mixers(shifted):
            for name in ("x_r", "x_k", "x_v"):
                getattr(mixer, name).zero_()
        torch.testing.assert_close(shifted(IDS), reference(IDS), rtol=0, atol=0)


def _without_sparse_mixes(sd):
    # The sparse blocks are moba.N.* in both layouts; the RWKV blocks keep their own x_* mixes.
    return {k: v for k, v in sd.items() if not (k.startswith("moba.") and ".att.x_" in k)}


def test_file_keys_carry_it_both_ways(tmp_path):
    sd = random_official_state_dict(RWKVXConfig(sparse_token_shift=True, **CFG), seed=5, layout=REFERENCE_RWKVX)
    assert {"moba.0.att.x_r", "moba.0.att.x_k", "moba.1.att.x_v"} <= set(sd)
    path = tmp_path / "shift.pth"
    torch.save(sd, path)
    model = megatron_rwkvx.load_pretrained(str(path), **{k: CFG[k] for k in ("sparse_chunk_size", "sparse_top_k")},
                                           layer_pattern="RARA")
    assert model.config.sparse_token_shift
    again = export_state_dict(model, model.config, REFERENCE_RWKVX, fill_unused=False)
    assert set(again) == set(sd)
    for key in sd:
        torch.testing.assert_close(again[key], sd[key], rtol=0, atol=0)
    # The reference layout without the mixes reads as the reference block.
    plain = _without_sparse_mixes(sd)
    torch.save(plain, path)
    assert not megatron_rwkvx.load_pretrained(str(path), layer_pattern="RARA").config.sparse_token_shift


@pytest.mark.parametrize("init", ["zero", "copy"])
def test_expansion_adds_the_mixes_and_still_reproduces_the_base(tiny_kwargs, init, tmp_path):
    base = random_official_state_dict(RWKVXConfig(num_layers=4, **tiny_kwargs), seed=2)
    expanded, pattern = expand_rwkv7_state_dict(base, num_sparse_blocks=2, init=init, token_shift=True)
    assert pattern == "RRARRA"
    for i, before in ((0, 1), (1, 3)):  # sparse block i follows RWKV block `before`
        for name in ("x_r", "x_k", "x_v"):
            got = expanded[f"moba.{i}.att.{name}"]
            want = (base[f"blocks.{before}.att.{name}"] if init == "copy"
                    else torch.full_like(got, SPARSE_SHIFT_INIT))
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    if init == "zero":  # identity blocks: the base's outputs exactly
        torch.save(base, tmp_path / "base.pth")
        torch.save(expanded, tmp_path / "x.pth")
        a = megatron_rwkvx.load_pretrained(str(tmp_path / "base.pth"))
        b = megatron_rwkvx.load_pretrained(str(tmp_path / "x.pth"), sparse_chunk_size=8, sparse_top_k=2)
        assert b.config.sparse_token_shift
        with torch.no_grad():
            x, y = a(IDS), b(IDS)
        assert ((x - y).abs().max() / x.abs().max()).item() < 1e-5


@pytest.fixture(scope="module")
def shift_dir(tmp_path_factory):
    model = _model(True, random_official_state_dict(RWKVXConfig(sparse_token_shift=True, **CFG), seed=6))
    directory = str(tmp_path_factory.mktemp("shift") / "ckpt")
    save_model_checkpoint(model, model.config, directory, iteration=1)
    with torch.no_grad():
        return directory, model(IDS)


def test_a_checkpoint_round_trips_the_mixes(shift_dir):
    directory, before = shift_dir
    model = _model(True)
    load_model_checkpoint(model, model.config, directory)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), before, rtol=0, atol=0)


def _args(*argv):
    return parse_args([*TRAIN, *argv], world_size=1)


def test_a_checkpoint_keeps_it_and_the_other_setting_is_refused(shift_dir):
    shift_dir, _ = shift_dir
    assert read_model_config(shift_dir)["sparse_token_shift"] is True
    # --init-from takes it; the opposite flag is refused naming both.
    assert build_config(_args("--init-from", shift_dir), 128).sparse_token_shift
    with pytest.raises(ArgumentError, match=r"--sparse-token-shift False disagrees with --init-from .*"
                                            r"sparse_token_shift = True"):
        build_config(_args("--init-from", shift_dir, "--no-sparse-token-shift"), 128)
    # A resume that forgets the flag is refused by the resume policy, naming the flag.
    args = _args(*SHAPE, "--load", shift_dir, "--save", shift_dir)
    _, error, _ = _inspect_directories(args, build_config(args, 128))
    assert error is not None and "sparse_token_shift: checkpoint True vs model False" in error
    assert "pass --sparse-token-shift" in error
    # And the loader itself refuses it.
    plain = RWKVXConfig(use_cpu_initialization=True, **CFG)
    with pytest.raises(CheckpointFormatError, match="sparse_token_shift: checkpoint True vs model False"):
        load_model_checkpoint(RWKVXModel(plain, parallel_output=False), plain, shift_dir)
    # No checkpoint and no flag: off (the reference block).
    assert not build_config(_args(*SHAPE), 128).sparse_token_shift
    assert build_config(_args(*SHAPE, "--sparse-token-shift"), 128).sparse_token_shift
