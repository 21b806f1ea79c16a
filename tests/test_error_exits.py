"""Bad input ends the entry points with one ``error: ...`` line and exit status 2, not a traceback;
and tools/generate.py streams text right with SentencePiece / Hugging Face tokenizers."""
from __future__ import annotations

import importlib.util
import io
import random
import re
import shutil
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import TINY
from test_data_datasets import make_dataset
from test_tokenizer_builders import SENTENCES
from test_training_system import PY, _env, _run

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--hidden-size", "64", "--head-size", "16", "--layer-pattern", "RRAR", "--sparse-chunk-size", "16",
         "--sparse-top-k", "2"]
RUN = ["--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--device", "cpu",
       "--train-iters", "1", "--eval-iters", "0"]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    # Single-process runs still open a TCP store; runs side by side need their own ports.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_with_port():
    env = _env()
    env["MASTER_PORT"] = str(_free_port())
    return env


def _assert_clean_error(out, *phrases):
    assert out.returncode == 2, f"exit {out.returncode}\n{out.stderr[-4000:]}"
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-4000:]
    for phrase in phrases:
        assert phrase in errors[0], (phrase, errors[0])


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A 40-piece SentencePiece model, as tests/test_tokenizer_builders.py trains it."""
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=buf, vocab_size=40,
                                   minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tok.model"
    path.write_bytes(buf.getvalue())
    return str(path)


def _garbage(path) -> str:
    # Bytes that torch's weights-only unpickler answers with "please file an issue".
    Path(path).write_bytes(random.Random(0).randbytes(4096))
    return str(path)


def _flip_index_bytes(prefix: str, out: str) -> str:
    """A copy of ``prefix`` with four bytes of its .idx changed: a length of 65535 tokens that the
    .bin does not hold at that place (before validation, training ran to the end on it, exit 0)."""
    shutil.copy(prefix + ".bin", out + ".bin")
    raw = bytearray(Path(prefix + ".idx").read_bytes())
    raw[34 + 4:34 + 8] = struct.pack("<i", 65535)  # sequence 1's length (after the 34-byte header)
    Path(out + ".idx").write_bytes(bytes(raw))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    release = d / "release"  # Megatron-LM's pointer to its release/ directory
    release.mkdir()
    (release / "latest_checkpointed_iteration.txt").write_text("release\n")
    release_with_config = d / "release_with_config"
    release_with_config.mkdir()
    (release_with_config / "latest_checkpointed_iteration.txt").write_text("release\n")
    (release_with_config / "model_config.json").write_text('{"hidden_size": 64}')
    no_config = d / "no_config"
    (no_config / "iter_0000003").mkdir(parents=True)
    (no_config / "latest_checkpointed_iteration.txt").write_text("3\n")
    lost_iteration = d / "lost_iteration"
    lost_iteration.mkdir()
    (lost_iteration / "latest_checkpointed_iteration.txt").write_text("7\n")
    (lost_iteration / "model_config.json").write_text('{"hidden_size": 64}')
    data = make_dataset(str(d / "docs"), 200, seed=0)  # ids < 500, World-sized model
    return {
        "data": data,
        "flipped_idx": _flip_index_bytes(data, str(d / "flipped")),
        "garbage": _garbage(d / "garbage.pth"),
        "missing": str(d / "foo.pth"),
        "release": str(release),
        "release_with_config": str(release_with_config),
        "no_config": str(no_config),
        "lost_iteration": str(lost_iteration),
        "nope": str(d / "nope"),
    }


# Through the real entry point in a subprocess: name -> (extra arguments, later ones win; phrases
# the error line must hold). One per kind of input error.
PRETRAIN_CASES = {
    "missing data prefix": (lambda f, sp: ["--data-path", f["nope"]], ["nope.idx", "preprocess_data"]),
    "sentencepiece without its model": (lambda f, sp: ["--tokenizer-type", "SentencePieceTokenizer"],
                                        ["--tokenizer-model"]),
    "token ids beyond the vocabulary": (
        lambda f, sp: ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp],
        ["40 rows", "tokenizer"]),
    "flipped bytes in the .idx": (lambda f, sp: ["--data-path", f["flipped_idx"]],
                                  ["flipped.idx", "sequence 2 starts at byte", "remake it"]),
    "unpaired blend weights": (lambda f, sp: ["--data-path", "0.5", f["data"], "0.5"], ["alternate"]),
    "unknown layer symbol": (lambda f, sp: ["--layer-pattern", "RRXR"], ["'X'"]),
    "garbage init-from": (lambda f, sp: ["--init-from", f["garbage"]],
                          ["garbage.pth", "not a PyTorch checkpoint", "torch.save"]),
    "release pointer in --load": (lambda f, sp: ["--load", f["release"]], ["--load", "'release'", "Megatron-LM"]),
    "load without model_config.json": (lambda f, sp: ["--load", f["no_config"]], ["--load", "model_config.json"]),
    "load pointing at a missing save": (lambda f, sp: ["--load", f["lost_iteration"]], ["iter_0000007", "missing"]),
    "a forced backend that cannot run here": (lambda f, sp: ["--wkv-backend", "triton"],
                                              ["--wkv-backend triton", "'triton'", "'auto'"]),
    "unknown backend name": (lambda f, sp: ["--sparse-attention-backend", "flash"],
                             ["--sparse-attention-backend flash", "unknown backend 'flash'", "'torch'"]),
}


@pytest.fixture(scope="module")
def cli_runs(files, sp_model):
    """Every subprocess of this file, two at a time (each is mostly interpreter and import start-up)."""
    def pretrain(case):
        extra = PRETRAIN_CASES[case][0](files, sp_model)
        return [PY, "-m", "megatron_rwkvx.pretrain", *MODEL, *RUN, "--data-path", files["data"], *extra]

    commands = {case: pretrain(case) for case in PRETRAIN_CASES}
    commands["convert garbage"] = [PY, "tools/convert_rwkv7_to_rwkvx.py", "--input", files["garbage"],
                                   "--output", files["nope"] + ".pth", "--num-sparse-blocks", "1"]

    def launch(command):
        return _run(command, env=_env_with_port(), timeout=300, check=False)

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(commands, pool.map(launch, commands.values())))


@pytest.mark.parametrize("case", list(PRETRAIN_CASES))
def test_pretrain_reports_bad_input_without_a_traceback(cli_runs, case):
    out = cli_runs[case]
    _assert_clean_error(out, *PRETRAIN_CASES[case][1])
    assert "file an issue" not in out.stderr


def _main_in_process(files, *extra):
    from megatron_rwkvx.pretrain import main

    return main([*MODEL, *RUN, "--data-path", files["data"], *map(str, extra)])


# Refused before any process group exists (argument checks, --init-from), so main() can run in
# this process.
EARLY_CASES = {
    "empty valid split": (["--split", "100,0,0", "--eval-iters", "1"], ["valid split empty", "--eval-iters 0"]),
    "empty train split": (["--split", "0,50,50"], ["train split empty"]),
    "malformed split": (["--split", "a,b"], ["--split 'a,b'"]),
    "full recompute without a method": (["--recompute-granularity", "full"], ["--recompute-method uniform or block"]),
    "missing init-from": (["--init-from", "{missing}"], ["foo.pth", "does not exist"]),
    "release init-from": (["--init-from", "{release_with_config}"], ["--init-from", "'release'"]),
}


@pytest.mark.parametrize("case", list(EARLY_CASES))
def test_pretrain_refuses_before_starting(files, capsys, case):
    from megatron_rwkvx.parallel.state import ensure_single_process_parallel_state

    ensure_single_process_parallel_state()  # a caller's group (other in-process tests use it)
    extra, phrases = EARLY_CASES[case]
    rc = _main_in_process(files, *[a.format(**files) for a in extra])
    assert torch.distributed.is_initialized(), "main() destroyed the caller's process group"
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)


def test_converter_cli_garbage_pth_without_a_traceback(cli_runs):
    out = cli_runs["convert garbage"]
    _assert_clean_error(out, "garbage.pth", "not a PyTorch checkpoint")
    assert "file an issue" not in out.stderr


def test_input_errors_do_not_hide_programming_errors():
    from megatron_rwkvx.pretrain import _input_errors

    caught = _input_errors()
    for err in (ValueError("x"), TypeError("x"), KeyError("x"), RuntimeError("x"), AssertionError()):
        assert not isinstance(err, caught), err


@pytest.mark.distributed
def test_a_data_error_on_one_rank_ends_the_whole_torchrun_job(files, tmp_path):
    """Only rank 1 finds the problem: it reports it once, cleanly, and exits 2 at once; rank 0
    does not hang in its next collective (torchrun stops the group, or gloo fails the collective)."""
    script = tmp_path / "one_rank_fails.py"
    script.write_text(
        "import os, sys\n"
        "import megatron_rwkvx.training.data as data\n"
        "from megatron_rwkvx.data.indexed import DatasetFileError\n"
        "check = data.check_data_vocab\n"
        "def only_rank1(args, vocab):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise DatasetFileError('rank 1 cannot read its copy of the data')\n"
        "    return check(args, vocab)\n"
        "data.check_data_vocab = only_rank1\n"
        "from megatron_rwkvx.pretrain import main\n"
        "sys.exit(main())\n"
    )
    out = _run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
                str(script), *MODEL, *RUN, "--data-path", files["data"]], timeout=240, check=False)
    assert out.returncode != 0
    assert out.stderr.count("error: rank 1 cannot read its copy of the data") == 1, out.stderr[-4000:]
    assert "[rank1]" not in out.stderr, out.stderr[-4000:]  # no traceback from the failing rank
    # Rank 0's collective may fail first (gloo notices the closed connection at once), but the
    # failing rank leaves before it, so torchrun blames the rank with the input error.
    assert re.search(r"Root Cause.*?rank\s*:\s*1\b.*?exitcode\s*:\s*2\b", out.stderr, re.S), out.stderr[-3000:]


# --- .pth files that are not checkpoints ------------------------------------------------------


def _bad_pth_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(4)}, good)
    data = good.read_bytes()
    files = {"random bytes": _garbage(tmp_path / "random.pth"), "empty": tmp_path / "empty.pth",
             "text": tmp_path / "text.pth", "truncated": tmp_path / "truncated.pth"}
    files["empty"].write_bytes(b"")
    files["text"].write_text("not a checkpoint\n" * 20)
    files["truncated"].write_bytes(data[: len(data) // 2])
    return {k: str(v) for k, v in files.items()}


def test_unreadable_pth_is_a_checkpoint_format_error(tmp_path):
    from megatron_rwkvx.checkpointing.official_format import CheckpointFormatError, load_state_dict_file

    for kind, path in _bad_pth_files(tmp_path).items():
        with pytest.raises(CheckpointFormatError) as info:
            load_state_dict_file(path)
        message = str(info.value)
        assert path in message and "torch.save(model.state_dict()" in message, (kind, message)
        assert "file an issue" not in message, (kind, message)


# --- tools/convert_rwkv7_to_rwkvx.py ----------------------------------------------------------


@pytest.fixture(scope="module")
def converter_inputs(tmp_path_factory):
    from megatron_rwkvx.checkpointing.official_format import REFERENCE_RWKVX
    from megatron_rwkvx.config import RWKVXConfig
    from megatron_rwkvx.testing.checkpoints import random_official_state_dict

    d = tmp_path_factory.mktemp("convert")
    paths = {name: str(d / f"{name}.pth") for name in ("base3", "rwkvx", "hf", "list")}
    torch.save(random_official_state_dict(RWKVXConfig(num_layers=3, **TINY), seed=1), paths["base3"])
    torch.save(random_official_state_dict(RWKVXConfig(layer_pattern="RA", **TINY), seed=1,
                                          layout=REFERENCE_RWKVX), paths["rwkvx"])
    torch.save({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}, paths["hf"])
    torch.save([torch.zeros(2)], paths["list"])
    paths["garbage"] = _garbage(d / "garbage.pth")
    paths["missing"] = str(d / "missing.pth")
    paths["dir"] = str(d)
    return paths


CONVERTER_CASES = {
    "not an RWKV file": ("hf", ["--num-sparse-blocks", "1"], ["hf.pth", "Hugging Face", "RWKV-7 (x070)"]),
    "a list": ("list", ["--num-sparse-blocks", "1"], ["list.pth", "not a flat state dict", "torch.save"]),
    "already RWKV-X": ("rwkvx", ["--num-sparse-blocks", "1"], ["already an RWKV-X", "nothing to expand"]),
    "uneven sparse blocks": ("base3", ["--num-sparse-blocks", "2"],
                             ["--num-sparse-blocks 2", "3 RWKV blocks", "1, 3", "--pattern RRARA"]),
    "no sparse blocks": ("base3", ["--num-sparse-blocks", "0"], ["at least 1"]),
    "missing file": ("missing", ["--num-sparse-blocks", "1"], ["missing.pth", "does not exist"]),
    "a directory": ("dir", ["--num-sparse-blocks", "1"], ["is a directory"]),
    "garbage": ("garbage", ["--num-sparse-blocks", "1"], ["garbage.pth", "not a PyTorch checkpoint"]),
}


@pytest.mark.parametrize("case", list(CONVERTER_CASES))
def test_converter_reports_bad_input(converter_inputs, tmp_path, capsys, case):
    source, extra, phrases = CONVERTER_CASES[case]
    out = tmp_path / "out.pth"
    rc = _tool("convert_rwkv7_to_rwkvx").main(["--input", converter_inputs[source], "--output", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: "), err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    assert not out.exists()


# --- tools/generate.py ------------------------------------------------------------------------


def _write_model(path, vocab: int, favourite: int) -> str:
    """A tiny RWKV-7 .pth whose every next-token argmax is ``favourite``: the final norm outputs
    its bias (ones) and only the head row of ``favourite`` is non-zero."""
    from megatron_rwkvx.config import RWKVXConfig
    from megatron_rwkvx.testing.checkpoints import random_official_state_dict

    sd = random_official_state_dict(RWKVXConfig(num_layers=1, **{**TINY, "vocab_size": vocab}), seed=0)
    sd["ln_out.weight"].zero_()
    sd["ln_out.bias"].fill_(1.0)
    sd["head.weight"].zero_()
    sd["head.weight"][favourite] = 1.0
    torch.save(sd, path)
    return str(path)


def _generate(model, sp, prompt, new_tokens, monkeypatch=None):
    """Run the tool with the SentencePiece tokenizer; returns (exit code, generated ids or None)."""
    outputs = []
    if monkeypatch is not None:
        import megatron_rwkvx.inference.generation as generation

        real = generation.generate

        def recording(*args, **kwargs):
            result = real(*args, **kwargs)
            outputs.extend(result)
            return result

        monkeypatch.setattr(generation, "generate", recording)
    rc = _tool("generate").main(["--model", model, "--tokenizer-type", "SentencePieceTokenizer",
                                 "--tokenizer-model", sp, "--prompt", prompt,
                                 "--max-new-tokens", str(new_tokens), "--temperature", "0"])
    return rc, outputs


@pytest.mark.usefixtures("one_thread")
def test_generate_keeps_the_space_between_prompt_and_continuation(sp_model, tmp_path, capsys):
    from megatron_rwkvx.data.tokenizers import build_tokenizer

    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    qu = tok.tokenize("quick")[0]  # the piece "\u2581qu": a word start
    assert tok.detokenize([qu]) == "qu"  # decoded alone, SentencePiece drops its space
    prompt = "The quick brown fox"
    assert tok.detokenize(tok.tokenize(prompt)) == prompt
    rc, _ = _generate(_write_model(tmp_path / "m.pth", tok.vocab_size, qu), sp_model, prompt, 3)
    assert rc == 0
    assert capsys.readouterr().out == "The quick brown fox qu qu qu\n"


@pytest.mark.usefixtures("one_thread")
def test_generate_ends_at_the_tokenizers_own_end_of_document(sp_model, tmp_path, capsys,
                                                             monkeypatch):
    from megatron_rwkvx.data.tokenizers import build_tokenizer

    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    assert tok.eod == 2
    rc, outputs = _generate(_write_model(tmp_path / "eod.pth", tok.vocab_size, tok.eod), sp_model,
                            "The quick", 4, monkeypatch)
    assert rc == 0 and outputs == [[tok.eod]]
    assert capsys.readouterr().out == "The quick\n"
    # Id 0 is SentencePiece's <unk>: an ordinary (if unlucky) token, not the end of the text.
    rc, outputs = _generate(_write_model(tmp_path / "unk.pth", tok.vocab_size, 0), sp_model,
                            "The quick", 3, monkeypatch)
    assert rc == 0 and outputs[-1] == [0, 0, 0]
    assert capsys.readouterr().out.count("\u2047") == 3  # how SentencePiece writes <unk>


@pytest.mark.usefixtures("one_thread")
def test_generate_refuses_a_tokenizer_the_model_was_not_trained_with(tmp_path, capsys):
    model = _write_model(tmp_path / "small.pth", 512, 5)
    rc = _tool("generate").main(["--model", model, "--prompt", "The capital of France is",
                                 "--max-new-tokens", "2", "--temperature", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: "), err
    for phrase in ("RWKVWorldTokenizer", "65536", "512 rows", "--tokenizer-type"):
        assert phrase in err, (phrase, err)


def _metaspace_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["\u2581The", "\u2581quick", "\u2581brown", "\u2581fox", "\u2581jumps", "\u2581over"]
    vocab = {w: i for i, w in enumerate(["[UNK]", "<|endoftext|>", *words])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tok.decoder = tokenizers.decoders.Metaspace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["RWKVWorldTokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer"])
def test_text_stream_prints_exactly_the_continuation(kind, sp_model, tmp_path):
    from megatron_rwkvx.data.tokenizers import build_tokenizer

    stream_cls = _tool("generate").TextStream
    if kind == "RWKVWorldTokenizer":
        tok = build_tokenizer(kind)
        # Multi-byte characters split over tokens, and more tokens than the stream's context.
        text = "Once upon a time \u5929\u4e0b\u592a\u5e73 \U0001f30d\U0001f680 caf\u00e9 " * 4
    elif kind == "SentencePieceTokenizer":
        tok = build_tokenizer(kind, sp_model)
        text = "The quick brown fox jumps over the lazy dog. How vexingly quick daft zebras jump!"
    else:
        tok = build_tokenizer(kind, _metaspace_tokenizer(tmp_path))
        text = "The quick brown fox jumps over The quick brown fox"
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text
    for cut in (1, 3, len(ids) // 2):
        out = io.StringIO()
        stream = stream_cls(tok, ids[:cut], out=out)
        for token in ids[cut:]:
            stream.push(token)
        stream.finish()
        assert out.getvalue() == text[len(tok.detokenize(ids[:cut])):] + "\n", (kind, cut)
    out = io.StringIO()
    stream = stream_cls(tok, [], out=out)
    for token in [*ids[:2], tok.eod, *ids[2:]]:
        stream.push(token)
    stream.finish()
    assert out.getvalue() == text + "\n"


def test_a_refusal_reaches_stderr_in_one_write(monkeypatch):
    """The ranks of a job share stderr: a refusal written as text and newline apart runs into the
    next rank's (seen in CI), so pretrain writes each error line whole."""
    from megatron_rwkvx import pretrain

    class Writes(io.StringIO):
        def __init__(self):
            super().__init__()
            self.calls = []

        def write(self, s):
            self.calls.append(s)
            return super().write(s)

    stderr = Writes()
    monkeypatch.setattr("sys.stderr", stderr)
    assert pretrain._report(ValueError("--load x: iteration 4 is damaged")) == 2
    assert stderr.calls == ["error: --load x: iteration 4 is damaged\n"]
