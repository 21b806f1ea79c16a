"""The copy probe (evaluation/copy_probe.py, tools/eval_copy.py): it scores exactly the second copies,
a right and a wrong prediction as such, and an induction head's weight where it lies."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_rwkvx.data.tokenizers import ByteTokenizer
from megatron_rwkvx.evaluation import copy_probe

from test_retrieval_study import bare_recorder

ROOT = Path(__file__).resolve().parents[1]


def test_copy_prompt_marks_both_copies_of_every_string():
    tok = ByteTokenizer()
    ids, lines = copy_probe.copy_prompt(tok, 200, 12, seed=1)
    assert len(ids) <= 200 and len(lines) >= 4
    for source, copy, n in lines:
        assert n == 12 and copy > source + n
        assert ids[source:source + n] == ids[copy:copy + n]
        assert tok.detokenize(ids[copy - 7:copy]) == "Again: " and tok.detokenize(ids[copy + n:copy + n + 1]) == "."
    # Another seed, other strings: the probe averages over different documents.
    assert copy_probe.copy_prompt(tok, 200, 12, seed=2)[0] != ids


@pytest.mark.parametrize("shift, accuracy", [(0, 1.0), (1, 0.0)])
def test_scores_right_and_wrong_copies(shift, accuracy):
    ids, lines = copy_probe.copy_prompt(ByteTokenizer(), 200, 12, seed=0)
    nxt = torch.tensor(ids[1:] + [0])
    logits = 30.0 * torch.nn.functional.one_hot((nxt + shift) % 257, 257).float()
    loss, acc, scored = copy_probe.score_copies(logits, ids, lines)
    assert scored == 12 * len(lines) and acc == accuracy
    assert loss == pytest.approx(0.0, abs=1e-6) if shift == 0 else loss > 20


def test_induction_weight_is_the_weight_on_the_token_after_the_match():
    recorder = bare_recorder(4, 4)
    recorder.mixers = [type("Mixer", (), {"local_heads": 1, "head_size": 4})()]
    t, lines = 16, [(2, 9, 3)]  # source 2..4, copy 9..11
    q, k = torch.zeros(t, 1, 4), torch.zeros(t, 1, 4)
    for i in range(2):  # copy position 9 + i looks at source position 3 + i only
        q[9 + i, 0, i] = 10.0
        k[3 + i, 0, i] = 1.0
    weights = copy_probe.induction_weight(recorder, [(q, k)], lines)
    e = math.exp(10 / 2)
    assert weights == [pytest.approx((e / (e + 9) + e / (e + 10)) / 2)]
    # Spread evenly, the heads would give the target 1 / the keys they read: 10 at position 9, 11 at 10.
    assert copy_probe.induction_weight(recorder, [(q, k)], lines, even=True) == [pytest.approx((1 / 10 + 1 / 11) / 2)]


def test_tool_on_a_tiny_model(tmp_path):
    from conftest import TINY
    from megatron_rwkvx.checkpointing.official_format import REFERENCE_RWKVX
    from megatron_rwkvx.config import RWKVXConfig
    from megatron_rwkvx.testing.checkpoints import random_official_state_dict

    path = tmp_path / "rwkvx.pth"
    torch.save(random_official_state_dict(RWKVXConfig(layer_pattern="RA", **{**TINY, "vocab_size": 257}), seed=3,
                                          layout=REFERENCE_RWKVX), path)
    common = [sys.executable, str(ROOT / "tools" / "eval_copy.py"), "--model", str(path), "--tokenizer-type",
              "ByteTokenizer", "--set", "sparse_chunk_size=32", "--set", "sparse_top_k=2", "--context", "160"]
    out = subprocess.run(common + ["--string-lengths", "5,20", "--seeds", "2", "--output-dir", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "o" / "copy.md").read_text()
    assert "| 5 |" in table and "| 20 |" in table and (tmp_path / "o" / "copy.png").stat().st_size > 0
    rows = json.loads((tmp_path / "o" / "copy.json").read_text())
    assert len(rows) == 4 and all(len(r["induction_weight"]) == len(r["even_weight"]) == 1 and 0 <= r["accuracy"] <= 1
                                  and 0 < r["even_weight"][0] <= 1 for r in rows)
    bad = subprocess.run(common + ["--string-lengths", "200", "--output-dir", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: a copy line of 200")
