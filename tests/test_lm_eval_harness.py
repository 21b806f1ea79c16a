"""lm-evaluation-harness end to end: its own CLI (through ``megatron_rwkvx.evaluation.lm_eval_cli``,
which registers ``--model rwkvx``) runs four local tasks, one per request type lm-eval has
(loglikelihood, multiple choice, rolling loglikelihood, generation), on a tiny RWKV-X ``.pth``.
Every logged response is checked against the full-sequence forward of the same model, so the
numbers lm-eval aggregates are the model's, not the adapter's."""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megatron_rwkvx
from megatron_rwkvx.data.tokenizers import build_tokenizer
from megatron_rwkvx.inference import InferenceEngine
from megatron_rwkvx.inference.generation import generate

from conftest import write_tiny_world_rwkvx


ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = dict(layer_pattern="RA", sparse_chunk_size=16, sparse_top_k=2)

DOCS = [
    {"text": "The grass is green and the sky is blue over the quiet town today",
     "choices": ["green", "red", "quiet"], "gold": 0},
    {"text": "One two three four five six seven eight nine ten eleven twelve",
     "choices": ["twelve", "seven"], "gold": 0},
    {"text": "A small cat sat on the warm mat near the old wooden door",
     "choices": ["door", "window", "mat"], "gold": 2},
]

TASKS = {
    "rwkvx_tiny_lastword": """
output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' ' + text.split(' ')[-1]}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "rwkvx_tiny_choice": """
output_type: multiple_choice
doc_to_text: "{{text.split(' ')[:5]|join(' ')}}"
doc_to_choice: "{{choices}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "rwkvx_tiny_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "rwkvx_tiny_generate": """
output_type: generate_until
doc_to_text: "{{text.split(' ')[:6]|join(' ')}}"
doc_to_target: "{{' ' + text.split(' ')[6]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    pth = write_tiny_world_rwkvx(root / "tiny_rwkvx.pth", seed=11)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, body in TASKS.items():
        head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {data}\ntest_split: test\n")
        (tasks / f"{name}.yaml").write_text(head + body.lstrip("\n"))
    out = root / "out"
    model_args = f"pretrained={pth}," + ",".join(f"{k}={v}" for k, v in OVERRIDES.items())
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rwkvx.evaluation.lm_eval_cli", "--model", "rwkvx",
         "--model_args", model_args, "--tasks", ",".join(TASKS), "--include_path", str(tasks),
         "--output_path", str(out), "--log_samples"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results_file,) = glob.glob(str(out / "*" / "results_*.json"))
    results = json.loads(Path(results_file).read_text())["results"]
    samples = {}
    for name in TASKS:
        (path,) = glob.glob(str(out / "*" / f"samples_{name}_*.jsonl"))
        samples[name] = sorted((json.loads(line) for line in Path(path).read_text().splitlines()),
                               key=lambda s: s["doc_id"])
    model = megatron_rwkvx.load_pretrained(str(pth), **OVERRIDES)
    return dict(results=results, samples=samples, stdout=proc.stdout, model=model,
                tokenizer=build_tokenizer("RWKVWorldTokenizer"))


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)


def _score(model, tokenizer, context, continuation):
    """(sum log p(continuation | context), greedy) from one full forward pass."""
    ctx = tokenizer.tokenize(context)
    cont = tokenizer.tokenize(context + continuation)[len(ctx):]
    lp = _logprobs(model, ctx + cont)
    positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    total = sum(float(lp[p, t]) for p, t in zip(positions, cont))
    return total, all(int(lp[p].argmax()) == t for p, t in zip(positions, cont))


def test_cli_prints_every_task(setup):
    for name in TASKS:
        assert name in setup["stdout"]
    assert set(TASKS) <= set(setup["results"])


def test_loglikelihood_task_matches_the_full_forward(setup):
    model, tok = setup["model"], setup["tokenizer"]
    samples = setup["samples"]["rwkvx_tiny_lastword"]
    assert len(samples) == len(DOCS)
    lls, accs = [], []
    for s, doc in zip(samples, DOCS):
        words = doc["text"].split(" ")
        want, greedy = _score(model, tok, " ".join(words[:-1]), " " + words[-1])
        got, got_greedy = s["resps"][0][0]
        assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-4)
        assert (got_greedy in (True, "True")) == greedy
        lls.append(want)
        accs.append(float(greedy))
    res = setup["results"]["rwkvx_tiny_lastword"]
    assert res["acc,none"] == pytest.approx(sum(accs) / len(accs))
    assert res["perplexity,none"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-4)


def test_multiple_choice_task_matches_the_full_forward(setup):
    model, tok = setup["model"], setup["tokenizer"]
    correct = []
    for s, doc in zip(setup["samples"]["rwkvx_tiny_choice"], DOCS):
        context = " ".join(doc["text"].split(" ")[:5])
        # lm-eval's default target delimiter is one space between the context and each choice.
        sent = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
        assert sent == [(context, " " + c) for c in doc["choices"]]
        want = [_score(model, tok, context, " " + c)[0] for c in doc["choices"]]
        got = [float(r[0][0]) for r in s["resps"]]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
        correct.append(float(max(range(len(want)), key=want.__getitem__) == doc["gold"]))
    assert setup["results"]["rwkvx_tiny_choice"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_rolling_loglikelihood_task_matches_the_full_forward(setup):
    model, tok = setup["model"], setup["tokenizer"]
    total_ll, total_words = 0.0, 0
    for s, doc in zip(setup["samples"]["rwkvx_tiny_rolling"], DOCS):
        ids = tok.tokenize(doc["text"])
        lp = _logprobs(model, [0] + ids)  # the first token is predicted from end-of-document
        want = sum(float(lp[i, t]) for i, t in enumerate(ids))
        assert float(s["resps"][0][0]) == pytest.approx(want, rel=1e-4, abs=1e-4)
        total_ll += want
        total_words += len(doc["text"].split())  # lm-eval counts whitespace-separated words
    got = setup["results"]["rwkvx_tiny_rolling"]["word_perplexity,none"]
    assert got == pytest.approx(math.exp(-total_ll / total_words), rel=1e-4)


def test_generation_task_matches_greedy_decoding(setup):
    model, tok = setup["model"], setup["tokenizer"]
    engine = InferenceEngine(model)
    hits = []
    for s, doc in zip(setup["samples"]["rwkvx_tiny_generate"], DOCS):
        words = doc["text"].split(" ")
        prompt = tok.tokenize(" ".join(words[:6]))
        tokens = [t for t in generate(engine, [prompt], 5, stop_tokens=(0,))[0] if t]
        want = tok.detokenize(tokens).split("\n")[0]
        assert s["resps"][0][0] == want
        hits.append(float(want == " " + words[6]))  # exact_match compares the strings as they are
    assert setup["results"]["rwkvx_tiny_generate"]["exact_match,none"] == pytest.approx(sum(hits) / len(hits))
