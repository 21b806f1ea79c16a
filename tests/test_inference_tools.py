"""The inference/evaluation tools on a tiny random RWKV-X model with the World vocabulary:
generation (API and CLI), sampling, passkey, loss by position, the lm-eval adapter."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import megatron_rwkvx
from megatron_rwkvx.data.tokenizers import build_tokenizer
from megatron_rwkvx.evaluation import long_loss, passkey
from megatron_rwkvx.evaluation.lm_eval_adapter import RWKVXLM
from megatron_rwkvx.evaluation.png import read_png_size
from megatron_rwkvx.inference import InferenceEngine
from megatron_rwkvx.inference.generation import generate
from megatron_rwkvx.inference.sampling import SamplingParams, sample_next

from conftest import write_tiny_world_rwkvx

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = dict(layer_pattern="RA", sparse_chunk_size=16, sparse_top_k=2)
SET_ARGS = ["--set", "layer_pattern=RA", "--set", "sparse_chunk_size=16", "--set", "sparse_top_k=2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world_pth(tmp_path_factory):
    return write_tiny_world_rwkvx(tmp_path_factory.mktemp("tools") / "world_rwkvx.pth", seed=5)


@pytest.fixture(scope="module")
def model(world_pth):
    return megatron_rwkvx.load_pretrained(str(world_pth), **OVERRIDES)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("RWKVWorldTokenizer")


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]])
    assert sample_next(logits, SamplingParams(temperature=0.0)).tolist() == [1]
    probs = torch.softmax(logits, -1)[0]
    # top_p just above the best token's mass keeps exactly the two best tokens.
    params = SamplingParams(temperature=1.0, top_p=float(probs[1]) + 1e-3)
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, params, g)) for _ in range(200)}
    assert seen == {1, 2}
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)


def test_greedy_generation_follows_the_full_forward(model, tokenizer):
    engine = InferenceEngine(model)
    prompts = [tokenizer.tokenize("The sky is blue. The grass"), tokenizer.tokenize("Hello")]
    streamed = []
    outs = generate(engine, prompts, 6, stop_tokens=(), on_token=lambda r, t: streamed.append((r, t)))
    for prompt, out in zip(prompts, outs):
        seq = list(prompt)
        for token in out:  # each generated token is the argmax of a full forward over the prefix
            with torch.no_grad():
                logits = model(torch.tensor([seq]))[0, -1]
            assert token == int(logits.argmax())
            seq.append(token)
    assert sorted(streamed) == sorted((r, t) for r, o in enumerate(outs) for t in o)
    sampled = generate(engine, prompts, 5, SamplingParams(temperature=1.0, top_p=0.9), seed=3)
    again = generate(engine, prompts, 5, SamplingParams(temperature=1.0, top_p=0.9), seed=3)
    assert sampled == again and all(len(o) == 5 for o in sampled)


def test_generate_tool_streams_text(world_pth, model, tokenizer, capsys):
    rc = _tool("generate").main(["--model", str(world_pth), *SET_ARGS, "--prompt", "Once upon",
                                 "--max-new-tokens", "5", "--temperature", "0"])
    assert rc == 0
    printed = capsys.readouterr().out
    expected = generate(InferenceEngine(model), [tokenizer.tokenize("Once upon")], 5, stop_tokens=(0,))[0]
    assert printed == "Once upon" + tokenizer.detokenize([t for t in expected if t]) + "\n"


def test_generate_tool_loads_a_training_checkpoint_directory(world_pth, model, tmp_path):
    from megatron_rwkvx.pretrained import save_pretrained_as_megatron
    from megatron_rwkvx.inference.loading import load_model

    directory = tmp_path / "ckpt"
    save_pretrained_as_megatron(torch.load(world_pth, weights_only=True), str(directory), **OVERRIDES)
    loaded = load_model(str(directory))
    tokens = torch.randint(0, 65536, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens))
    with pytest.raises(ValueError, match="architecture"):
        load_model(str(directory), head_size=32)
    # The training choices a stage may change are not architecture: an evaluation may change them.
    assert load_model(str(directory), sparse_chunk_size=32).config.sparse_chunk_size == 32


def test_passkey_tool_writes_table_and_heatmap(world_pth, tmp_path, capsys):
    out = tmp_path / "pk"
    rc = _tool("eval_passkey").main(["--model", str(world_pth), *SET_ARGS, "--lengths", "90,140",
                                     "--depths", "3", "--seeds", "2", "--max-new-tokens", "3",
                                     "--piece-size", "50", "--output-dir", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| depth | 90 | 140 |" in printed and "| 50% |" in printed
    records = json.loads((out / "passkey.json").read_text())
    assert len(records) == 2 * 3 * 2
    assert all(r["prompt_tokens"] <= r["length"] for r in records)
    width, height = read_png_size((out / "passkey.png").read_bytes())
    assert width > 50 and height > 3 * 20


def test_passkey_scoring():
    assert passkey.first_number(" 12345. Remember") == "12345"
    assert passkey.first_number(" none") is None
    records = [
        {"length": n, "depth": d, "correct": ok}
        for n, d, ok in [(100, 0.0, True), (100, 0.0, False), (100, 1.0, True), (100, 1.0, True),
                         (200, 0.0, False), (200, 0.0, False), (200, 1.0, True), (200, 1.0, False)]
    ]
    lengths, depths, grid = passkey.accuracy_grid(records)
    assert (lengths, depths, grid) == ([100, 200], [0.0, 1.0], [[0.5, 0.0], [1.0, 0.5]])
    assert "| mean | 75% | 25% |" in passkey.format_table(records)
    assert passkey.depth_grid(3) == [0.0, 0.5, 1.0]


def test_loss_by_position_is_exact_and_the_tool_runs(world_pth, model, tmp_path, capsys):
    engine = InferenceEngine(model)
    ids = torch.randint(1, 65536, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    want = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    torch.testing.assert_close(long_loss.token_losses(engine, ids, piece_size=17), want, rtol=1e-5, atol=1e-5)
    assert long_loss.bucket_edges(300, first=32) == [0, 32, 64, 128, 256, 299]
    assert long_loss.bucket_edges(25, size=10) == [0, 10, 20, 24]

    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t}) for t in
                              ["The grass is green. " * 20, "short", "The sky is blue. " * 12]))
    out = tmp_path / "ll"
    rc = _tool("eval_long_loss").main(["--model", str(world_pth), *SET_ARGS, "--input", str(docs),
                                       "--min-length", "8", "--first-bucket", "16",
                                       "--output-dir", str(out)])
    assert rc == 0
    rows = json.loads((out / "long_loss.json").read_text())
    assert rows[0]["documents"] == 2 and rows[0]["start"] == 0 and rows[0]["end"] == 16
    assert "| positions | tokens |" in capsys.readouterr().out
    assert read_png_size((out / "long_loss.png").read_bytes())[0] > 100


def _request(*args):
    return SimpleNamespace(args=args)  # lm-eval's Instance: only .args is read


def test_lm_eval_adapter(model, tokenizer):
    lm = RWKVXLM(engine=InferenceEngine(model), tokenizer=tokenizer, piece_size=5)
    context, continuation = "The grass is green. The sky", " is blue."
    ctx = tokenizer.tokenize(context)
    cont = tokenizer.tokenize(context + continuation)[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0], -1)
    positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    want = sum(float(logp[p, t]) for p, t in zip(positions, cont))
    greedy = all(int(logp[p].argmax()) == t for p, t in zip(positions, cont))
    (got, is_greedy), (empty_ctx, _) = lm.loglikelihood([_request(context, continuation),
                                                         _request("", "Hello")])
    assert got == pytest.approx(want, rel=1e-5) and is_greedy == greedy
    hello = tokenizer.tokenize("Hello")
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([[0] + hello]))[0], -1)
    assert empty_ctx == pytest.approx(sum(float(lp[i, t]) for i, t in enumerate(hello)), rel=1e-5)
    # Trailing context spaces move to the continuation: same tokens, same score.
    (moved, _), = lm.loglikelihood([_request(context + " ", "is blue.")])
    assert moved == pytest.approx(want, rel=1e-5)

    (rolling,) = lm.loglikelihood_rolling([_request(context + continuation)])
    ids = tokenizer.tokenize(context + continuation)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([[0] + ids]))[0], -1)
    assert rolling == pytest.approx(sum(float(lp[i, t]) for i, t in enumerate(ids)), rel=1e-5)

    free = generate(InferenceEngine(model), [ctx], 6, stop_tokens=(0,))[0]
    text = tokenizer.detokenize([t for t in free if t])
    (plain,) = lm.generate_until([_request(context, {"until": [], "max_gen_toks": 6})])
    assert plain == text
    assert text, "the model ended the text at once; pick another prompt"
    stop = text[len(text) // 2 :][:2]
    (cut,) = lm.generate_until([_request(context, {"until": [stop], "max_gen_toks": 6})])
    assert cut == text.split(stop)[0]


def test_lm_eval_adapter_arguments(world_pth):
    lm = RWKVXLM.create_from_arg_string(
        f"pretrained={world_pth},layer_pattern=RA,sparse_chunk_size=16,sparse_top_k=2,max_gen_toks=7",
        {"batch_size": 1, "device": "cpu"},
    )
    assert lm.max_gen_toks == 7 and lm.engine.model.config.sparse_chunk_size == 16
    with pytest.raises(ValueError, match="pretrained"):
        RWKVXLM()
    with pytest.raises(ValueError, match="key=value"):
        RWKVXLM.create_from_arg_string("pretrained")


def test_bench_decode_runs_at_toy_size(capsys):
    rc = _tool("bench_decode").main(["--contexts", "16,40", "--hidden", "64", "--pattern", "RA",
                                     "--vocab", "128", "--chunk-size", "8", "--steps", "2",
                                     "--warmup", "1", "--threads", "1"])
    assert rc == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| 16 |") or l.startswith("| 40 |")]
    assert len(lines) == 2 and lines[0].split("|")[5].strip() == "1.00"
