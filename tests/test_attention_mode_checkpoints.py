"""attention_mode is an architecture field: a dense model saved by training comes back dense on
resume, through --init-from, in an export and in the tools; another mode is refused with both values
and the fix; a checkpoint written before the field existed reads as sparse."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megatron_rwkvx
from megatron_rwkvx.checkpointing.megatron_format import (
    MODEL_CONFIG_FILE,
    load_model_checkpoint,
    read_model_config,
    save_model_checkpoint,
)
from megatron_rwkvx.checkpointing.official_format import CheckpointFormatError, import_state_dict
from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.inference.loading import load_model
from megatron_rwkvx.models.rwkvx_model import RWKVXModel
from megatron_rwkvx.pretrained import file_config_path, prepare_runtime, read_file_config
from megatron_rwkvx.testing.checkpoints import random_official_state_dict
from megatron_rwkvx.training.arguments import ArgumentError, parse_args
from megatron_rwkvx.training.model_builder import build_config
from megatron_rwkvx.training.resume import _inspect_directories

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
# T = 40 > chunk x top-k = 16: here dense and top-k chunk attention compute different functions.
CFG = dict(TINY, layer_pattern="RARA", sparse_chunk_size=8, sparse_top_k=2)
VOCAB = TINY["vocab_size"]  # the NullTokenizer's (--vocab-size 128)
IDS = torch.randint(0, TINY["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(1))
TRAIN = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--seq-length", "48",
         "--micro-batch-size", "1", "--global-batch-size", "1", "--device", "cpu", "--lr", "1e-3"]
SHAPE = ["--layer-pattern", "RARA", "--hidden-size", "64", "--head-size", "16",
         "--sparse-chunk-size", "8", "--sparse-top-k", "2"]


def _model(mode, sd):
    cfg = RWKVXConfig(use_cpu_initialization=True, attention_mode=mode, **CFG)
    model = RWKVXModel(cfg, parallel_output=False)
    import_state_dict(model, sd, cfg)
    return model.eval()


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _logits(model):
    with torch.no_grad():
        return model(IDS)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """(directory of a saved dense model with random weights, its logits, the sparse model's)."""
    prepare_runtime(torch.device("cpu"))
    sd = random_official_state_dict(RWKVXConfig(**CFG), seed=3)
    dense = _model("dense", sd)
    directory = str(tmp_path_factory.mktemp("dense") / "ckpt")
    save_model_checkpoint(dense, dense.config, directory, iteration=1)
    sparse_logits = _logits(_model("sparse", sd))
    assert not torch.allclose(_logits(dense), sparse_logits, atol=1e-4)  # the mode matters here
    return directory, _logits(dense), sparse_logits


def _args(*argv):
    return parse_args([*TRAIN, "--train-iters", "2", *argv], world_size=1)


def test_a_resume_rebuilds_the_dense_model_and_refuses_the_other_mode(dense_dir):
    directory, before, _ = dense_dir
    assert read_model_config(directory)["attention_mode"] == "dense"
    args = _args(*SHAPE, "--load", directory, "--save", directory, "--use-checkpoint-args")
    cfg = build_config(args, VOCAB)
    assert cfg.attention_mode == "dense"
    model = RWKVXModel(cfg, parallel_output=False).eval()
    load_model_checkpoint(model, cfg, directory)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
    # Forgetting --attention-mode (the default, sparse) is refused by the resume policy, naming both.
    args = _args(*SHAPE, "--load", directory, "--save", directory)
    plan, error, _ = _inspect_directories(args, build_config(args, VOCAB))
    assert error is not None and "attention_mode: checkpoint 'dense' vs model 'sparse'" in error
    assert "--attention-mode dense" in error
    assert _inspect_directories(_args(*SHAPE, "--load", directory, "--attention-mode", "dense"),
                                cfg)[1] is None


def test_init_from_takes_the_saved_mode_and_refuses_the_other(dense_dir):
    directory, _, _ = dense_dir
    assert build_config(_args("--init-from", directory), VOCAB).attention_mode == "dense"
    with pytest.raises(ArgumentError, match=r"--attention-mode sparse disagrees with --init-from .*"
                                            r"attention_mode = dense.*--use-checkpoint-args"):
        build_config(_args("--init-from", directory, "--attention-mode", "sparse"), VOCAB)
    # The loader behind --init-from refuses it too (one check for --load and --init-from).
    sparse = RWKVXConfig(use_cpu_initialization=True, **CFG)
    with pytest.raises(CheckpointFormatError, match="attention_mode: checkpoint 'dense' vs model 'sparse'"):
        load_model_checkpoint(RWKVXModel(sparse, parallel_output=False), sparse, directory)
    # No checkpoint and no flag: the config's default.
    assert build_config(_args(*SHAPE), VOCAB).attention_mode == "sparse"


def test_the_tools_load_it_dense_and_the_decoder_refuses_it_in_one_line(dense_dir, capsys):
    directory, before, _ = dense_dir
    model = load_model(directory)
    assert model.config.attention_mode == "dense"
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
    generate = _tool("generate")
    with pytest.raises(SystemExit) as exit_:
        generate.main(["--model", directory, "--tokenizer-type", "ByteTokenizer", "--prompt", "a"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.startswith("error: the incremental decoder") and "attention_mode 'dense'" in err
    with pytest.raises(SystemExit):  # the mode cannot be overridden: it is the model's
        generate.main(["--model", directory, "--set", "attention_mode=sparse",
                       "--tokenizer-type", "ByteTokenizer", "--prompt", "a"])
    assert "cannot override architecture field(s) ['attention_mode']" in capsys.readouterr().err


def test_lm_eval_refuses_it_in_one_line(dense_dir, capsys, monkeypatch):
    from megatron_rwkvx.evaluation import lm_eval_cli

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "rwkvx", "--model_args",
                                      f"pretrained={dense_dir[0]}", "--device", "cpu", "--tasks", "arc_easy"])
    assert lm_eval_cli.main() == 2
    assert "error: the incremental decoder" in capsys.readouterr().err


def test_export_writes_the_mode_beside_the_pth(dense_dir, tmp_path):
    directory, before, _ = dense_dir
    export = _tool("export_checkpoint")
    out = str(tmp_path / "dense.pth")
    assert export.main(["--load", directory, "--output", out, "--dtype", "fp32"]) == 0
    assert json.load(open(file_config_path(out)))["attention_mode"] == "dense"
    model = megatron_rwkvx.load_pretrained(out)
    assert model.config.attention_mode == "dense"
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


def test_configs_written_before_the_field_read_as_sparse(dense_dir, tmp_path):
    directory, _, sparse_logits = dense_dir
    old = str(tmp_path / "old")
    shutil.copytree(directory, old)
    path = os.path.join(old, MODEL_CONFIG_FILE)
    saved = json.load(open(path))
    del saved["attention_mode"]
    json.dump(saved, open(path, "w"))
    assert read_model_config(old)["attention_mode"] == "sparse"
    model = load_model(old)
    assert model.config.attention_mode == "sparse"
    torch.testing.assert_close(_logits(model), sparse_logits, rtol=0, atol=0)
    # The same for the config beside a .pth (an export of an older version).
    pth = str(tmp_path / "old.pth")
    json.dump({"megatron_rwkvx_file_config": 1, "layer_pattern": "RARA"}, open(file_config_path(pth), "w"))
    assert read_file_config(pth)["attention_mode"] == "sparse"


def test_an_expansion_can_start_the_dense_baseline(tmp_path, capsys):
    base = str(tmp_path / "rwkv7.pth")
    torch.save(random_official_state_dict(RWKVXConfig(num_layers=2, **TINY), seed=2), base)
    convert = _tool("convert_rwkv7_to_rwkvx")
    out = str(tmp_path / "dense")
    assert convert.main(["--input", base, "--output", out, "--pattern", "RARA", "--output-format", "megatron",
                         "--attention-mode", "dense"]) == 0
    assert read_model_config(out)["attention_mode"] == "dense"
    # A reference-layout .pth has no place for the mode: refused rather than silently sparse.
    assert convert.main(["--input", base, "--output", str(tmp_path / "x.pth"), "--pattern", "RARA",
                         "--attention-mode", "dense"]) == 2
    assert "--output-format megatron" in capsys.readouterr().err


def test_training_saves_the_mode_and_a_resume_without_it_is_refused(tmp_path):
    """The trainer end to end: --attention-mode dense is written to model_config.json; a resume
    that leaves the flag out stops before training with one error line."""
    save = str(tmp_path / "run")
    from megatron_rwkvx.testing.distributed import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}

    def pretrain(*argv):
        return subprocess.run([sys.executable, "-m", "megatron_rwkvx.pretrain", *TRAIN, *SHAPE, "--save", save,
                               "--save-interval", "1", *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)

    first = pretrain("--train-iters", "1", "--attention-mode", "dense")
    assert first.returncode == 0, first.stderr[-3000:]
    assert read_model_config(save)["attention_mode"] == "dense"
    again = pretrain("--train-iters", "2", "--load", save)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "attention_mode: checkpoint 'dense' vs model 'sparse' (pass --attention-mode dense)" in again.stderr
    assert "Traceback" not in again.stderr
