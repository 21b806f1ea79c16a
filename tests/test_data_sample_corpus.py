"""tools/make_sample_corpus.py: real text and passkey documents, made offline, then preprocessed."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import make_sample_corpus  # noqa: E402

pytest.importorskip("rwkv")


def test_corpus_and_passkeys(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert make_sample_corpus.main(["--output", str(out), "--num-docs", "40", "--passkey-lengths", "200", "600",
                                    "--passkey-depths", "3", "--passkey-seeds", "2"]) == 0
    texts = [json.loads(line)["text"] for line in open(out / "text.jsonl", encoding="utf-8")]
    assert len(texts) == 40 and len(set(texts)) == 40 and all(len(t) >= 200 for t in texts)
    rows = [json.loads(line) for line in open(out / "passkey.jsonl", encoding="utf-8")]
    assert len(rows) == 2 * 3 * 2
    from megatron_rwkvx.data.tokenizers import RWKVWorldTokenizer

    tok = RWKVWorldTokenizer()
    for r in rows:
        needle = f"The pass key is {r['answer']}. Remember it. {r['answer']} is the pass key."
        assert needle in r["prompt"] and r["prompt"].endswith("What is the pass key? The pass key is")
        n = len(tok.tokenize(r["prompt"]))
        assert n == r["length_tokens"] and r["target_length"] - 40 < n <= r["target_length"]
        assert r["text"] == r["prompt"] + f" {r['answer']}."
    shallow, deep = rows[0]["prompt"], rows[-1]["prompt"]  # depth 0 vs depth 1
    assert shallow.index("pass key is") < len(shallow) // 4 < len(deep) * 3 // 4 < deep.index("pass key is")
    # Same arguments, same files; existing files are not replaced silently.
    assert make_sample_corpus.main(["--output", str(out), "--num-docs", "40"]) == 2
    assert "--overwrite" in capsys.readouterr().err
