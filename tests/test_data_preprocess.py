"""tools/preprocess_data.py: exact round trips, worker independence, formats, packing, bad input."""
from __future__ import annotations

import gzip
import json
import os
import sys

import numpy as np
import pytest

from megatron_rwkvx.data.indexed import DatasetFileError, check_token_ids, validate_indexed_dataset
from megatron_rwkvx.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess
from megatron_rwkvx.data.tokenizers import build_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import preprocess_data  # noqa: E402

pytest.importorskip("rwkv")

TEXTS = [
    "Hello world. This is the first document.\n",
    "中文文档：你好，世界！🚀 emoji and ünïcödé",
    "def f(x):\n    return x * 2  # code\n" * 20,
    "   leading spaces and trailing tabs\t\t",
    "A" * 300,
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("RWKVWorldTokenizer")


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def read_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def run(tmp_path, inp, name="out", quiet=True, **kw):
    logs = []
    cfg = PreprocessConfig(input=str(inp), output_prefix=str(tmp_path / name), log_interval=kw.pop("log_interval", 0), **kw)
    stats = run_preprocess(cfg, log=logs.append)
    return cfg, stats, logs


def test_round_trip_is_exact(tmp_path, tok):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    cfg, stats, _ = run(tmp_path, inp, append_eod=True)
    prefix = cfg.output_prefix_for("text")
    docs = read_docs(prefix)
    assert len(docs) == len(TEXTS) and stats.documents["text"] == len(TEXTS)
    for ids, text in zip(docs, TEXTS):
        assert ids[-1] == tok.eod and tok.detokenize(ids[:-1]) == text
        assert ids[:-1] == tok.tokenize(text)
    info = validate_indexed_dataset(prefix)
    assert info.dtype == np.uint16 and info.num_documents == len(TEXTS)


def test_workers_and_partitions_give_identical_bytes(tmp_path):
    rows = [{"text": f"document {i}: " + TEXTS[i % len(TEXTS)] * (1 + i % 7)} for i in range(700)]
    d = tmp_path / "in"
    d.mkdir()
    for k in range(3):
        write_jsonl(d / f"shard{k}.jsonl", rows[k * 250:(k + 1) * 250])
    outputs = []
    for name, workers, partitions in (("w1", 1, 1), ("w2", 2, 1), ("p2", 2, 2)):
        cfg, _, _ = run(tmp_path, d, name=name, workers=workers, partitions=partitions, append_eod=True)
        prefix = cfg.output_prefix_for("text")
        outputs.append(tuple(open(prefix + ext, "rb").read() for ext in (".bin", ".idx")))
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(read_docs(str(tmp_path / "w1_text_document"))) == 700


def test_gzip_parquet_multiple_keys_and_saved_hf_dataset(tmp_path, tok):
    rows = [{"text": t, "title": f"title {i}"} for i, t in enumerate(TEXTS)]
    with gzip.open(tmp_path / "in.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cfg, _, _ = run(tmp_path, tmp_path / "in.jsonl.gz", name="gz", json_keys=("text", "title"))
    assert [tok.detokenize(d) for d in read_docs(cfg.output_prefix_for("title"))] == [r["title"] for r in rows]

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "in.parquet")
    cfg, _, _ = run(tmp_path, tmp_path / "in.parquet", name="pq")
    assert [tok.detokenize(d) for d in read_docs(cfg.output_prefix_for("text"))] == TEXTS

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"content": TEXTS}).save_to_disk(str(tmp_path / "hf"))
    cfg, _, _ = run(tmp_path, tmp_path / "hf", name="hf", json_keys=("content",))
    assert [tok.detokenize(d) for d in read_docs(cfg.output_prefix_for("content"))] == TEXTS


def test_packing_and_length_filter(tmp_path, tok):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    cfg, stats, logs = run(tmp_path, inp, pack_length=16)
    docs = read_docs(cfg.output_prefix_for("text"))
    stream = [i for t in TEXTS for i in tok.tokenize(t) + [tok.eod]]
    assert all(len(d) == 16 for d in docs) and len(docs) == len(stream) // 16
    assert sum(docs, []) == stream[: len(docs) * 16]
    assert stats.dropped_remainder["text"] == len(stream) % 16
    assert any("packed into" in line for line in logs)

    lengths = [len(tok.tokenize(t)) for t in TEXTS]
    lo, hi = sorted(lengths)[1], sorted(lengths)[-2]
    cfg, stats, _ = run(tmp_path, inp, name="filtered", min_length=lo, max_length=hi)
    kept = [t for t, n in zip(TEXTS, lengths) if lo <= n <= hi]
    assert [tok.detokenize(d) for d in read_docs(cfg.output_prefix_for("text"))] == kept
    assert stats.too_short["text"] == 1 and stats.too_long["text"] == 1


def _no_leftovers(tmp_path, name="out"):
    left = [p for p in os.listdir(tmp_path) if p.startswith(name) or p.startswith("." + name)]
    assert left == [], f"half-written output left behind: {left}"


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"text": "unterminated', "malformed JSON"),
        (b'{"body": "no text key"}', "no key 'text'"),
        (b'{"text": 42}', "'text' is int, not a string"),
        (b'{"text": "bad \xff byte"}', "not valid UTF-8 \\(byte 0xff"),
        (b'["a list"]', "expected a JSON object"),
    ],
)
def test_bad_lines_fail_with_line_number_or_are_skipped(tmp_path, line, message):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"text": "good one"}\n' + line + b'\n{"text": "good two"}\n')
    with pytest.raises(PreprocessError, match=f"in.jsonl:2: {message}.*--skip-bad-lines"):
        run(tmp_path, inp, workers=2)
    _no_leftovers(tmp_path)
    cfg, stats, logs = run(tmp_path, inp, skip_bad_lines=True)
    assert stats.bad == 1 and stats.documents["text"] == 2
    assert any("skipped 1 bad line" in m for m in logs) and any("in.jsonl:2" in m for m in logs)


def test_empty_documents_are_counted_and_skipped(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": ""}, {"text": "x"}, {"text": ""}])
    cfg, stats, logs = run(tmp_path, inp, append_eod=True, drop_empty_documents=True)
    assert stats.empty["text"] == 2 and len(read_docs(cfg.output_prefix_for("text"))) == 1
    assert any("skipped 2 empty" in m for m in logs)
    # By default they stay, as documents of no sequences (Megatron-LM's .idx).
    cfg, stats, logs = run(tmp_path, inp, name="kept", append_eod=True)
    assert stats.empty["text"] == 2 and len(read_docs(cfg.output_prefix_for("text"))) == 1
    assert validate_indexed_dataset(cfg.output_prefix_for("text")).num_documents == 3
    assert any("2 empty, kept as documents of no sequences" in m for m in logs)


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "one"}])
    run(tmp_path, inp)
    with pytest.raises(PreprocessError, match="already exists.*--overwrite"):
        run(tmp_path, inp)
    write_jsonl(tmp_path / "in.jsonl", [{"text": "one"}, {"text": "two"}])
    cfg, _, _ = run(tmp_path, inp, overwrite=True)
    assert len(read_docs(cfg.output_prefix_for("text"))) == 2


def test_cli_reports_errors_and_writes_nothing(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert preprocess_data.main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}])
    assert preprocess_data.main(["--input", inp, "--output-prefix", out, "--tokenizer-type",
                                 "SentencePieceTokenizer"]) == 2
    assert "needs --tokenizer-model" in capsys.readouterr().err
    _no_leftovers(tmp_path)
    assert preprocess_data.main(["--input", inp, "--output-prefix", out, "--append-eod", "--log-interval", "1"]) == 0
    assert "docs/s" in capsys.readouterr().err


def test_truncated_bin_and_out_of_vocabulary_ids_are_detected(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    cfg, _, _ = run(tmp_path, inp, append_eod=True)
    prefix = cfg.output_prefix_for("text")
    with pytest.raises(DatasetFileError, match="holds token id .* vocabulary has 1000 rows"):
        check_token_ids([prefix], 1000, cache_dir=str(tmp_path / "cache"))
    check_token_ids([prefix], 65536, cache_dir=str(tmp_path / "cache"))
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") - 2)
    with pytest.raises(DatasetFileError, match="is truncated.*remake or re-copy"):
        validate_indexed_dataset(prefix)
    os.remove(prefix + ".idx")
    with pytest.raises(DatasetFileError, match="does not exist.*preprocess_data.py"):
        validate_indexed_dataset(prefix)
