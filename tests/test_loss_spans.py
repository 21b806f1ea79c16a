"""Training on marked spans: preprocess_data --loss-spans-key writes a loss mask beside the dataset,
pretrain --loss-on-spans reads it through megatron-core's sample walk (data/span_loss.py)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from megatron_rwkvx.data.datasets import build_gpt_datasets
from megatron_rwkvx.data.indexed import DatasetFileError, loss_mask_prefix, validate_loss_mask
from megatron_rwkvx.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess
from megatron_rwkvx.data.tokenizers import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()


def quiet(_message):
    pass  # a module-level function: partitions send it to their worker processes


def read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def qa_rows(n, seed=0):
    """Documents whose digits are exactly their answers: 'letters = digits; letters = digits ...'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text, spans = "", []
        for _ in range(rng.randint(1, 6)):
            text += "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 9))) + " = "
            answer = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 4)))
            spans.append([len(text), len(text) + len(answer)])
            text += answer + ("; " if rng.random() < 0.7 else "")
        rows.append({"text": text, "answers": spans})
    return rows


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def preprocess(tmp_path, rows, name="out", **kw):
    inp = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    options = {"tokenizer_type": "ByteTokenizer", "loss_spans_key": "answers", "append_eod": True, **kw}
    cfg = PreprocessConfig(input=inp, output_prefix=str(tmp_path / name), log_interval=0, **options)
    logs = []
    stats = run_preprocess(cfg, log=logs.append)
    return cfg.output_prefix_for("text"), stats, logs


def test_marks_are_the_spans_tokens_and_the_tokens_are_unchanged(tmp_path):
    rows = qa_rows(40) + [{"text": "no answer here", "answers": []},
                          {"text": "ends with 42", "answers": [[10, 12], [9, 11]]}]  # overlapping: merged
    prefix, stats, logs = preprocess(tmp_path, rows)
    plain = PreprocessConfig(input=str(tmp_path / "out.jsonl"), output_prefix=str(tmp_path / "plain"),
                             tokenizer_type="ByteTokenizer", append_eod=True, log_interval=0)
    run_preprocess(plain, log=quiet)
    tokens, marks = read(prefix), read(loss_mask_prefix(prefix))
    assert tokens == read(plain.output_prefix_for("text"))  # bytes: piecewise = whole-text tokenization
    for row, ids, m in zip(rows, tokens, marks):
        text = row["text"]
        inside = [any(a <= i < b for a, b in row["answers"]) for i in range(len(text))]
        # The end of document is marked where the last answer ends the text.
        ends_with_answer = bool(row["answers"]) and max(b for _, b in row["answers"]) == len(text)
        assert m == [int(x) for x in inside] + [int(ends_with_answer)]
        assert ids[-1] == TOK.eod
    assert stats.marked["text"] == sum(sum(m) for m in marks)
    assert "in 'answers' spans" in logs[-1] and "--loss-on-spans" in logs[-1]
    validate_loss_mask(prefix)


def test_subword_tokens_never_straddle_a_span_edge(tmp_path):
    pytest.importorskip("rwkv")
    from megatron_rwkvx.data.tokenizers import build_tokenizer

    tok = build_tokenizer("RWKVWorldTokenizer")
    rows = [{"text": "The answer is forty-two, obviously.", "answers": [[14, 23]]}]
    prefix, _, _ = preprocess(tmp_path, rows, tokenizer_type="RWKVWorldTokenizer")
    ids, marks = read(prefix)[0], read(loss_mask_prefix(prefix))[0]
    marked = [t for t, m in zip(ids, marks) if m]
    assert tok.detokenize(marked) == "forty-two"
    assert tok.detokenize(ids[:-1]) == rows[0]["text"]


def test_partitions_and_packing_carry_the_marks(tmp_path):
    rows = qa_rows(300, seed=1)
    d = tmp_path / "in"
    d.mkdir()
    for k in range(3):
        write_jsonl(d / f"shard{k}.jsonl", rows[k * 100:(k + 1) * 100])
    outs = {}
    for name, kw in (("one", {}), ("parts", {"workers": 2, "partitions": 3})):
        cfg = PreprocessConfig(input=str(d), output_prefix=str(tmp_path / name), tokenizer_type="ByteTokenizer",
                               append_eod=True, loss_spans_key="answers", log_interval=0, **kw)
        run_preprocess(cfg, log=quiet)
        p = cfg.output_prefix_for("text")
        outs[name] = [open(f + ext, "rb").read() for f in (p, loss_mask_prefix(p)) for ext in (".bin", ".idx")]
    assert outs["one"] == outs["parts"]

    packed, stats, _ = preprocess(tmp_path, rows, name="packed", pack_length=64)
    unpacked, _, _ = preprocess(tmp_path, rows, name="unpacked")
    stream = sum(read(unpacked), [])
    mark_stream = sum(read(loss_mask_prefix(unpacked)), [])
    n = stats.packed_sequences["text"]
    assert read(packed) == [stream[i * 64:(i + 1) * 64] for i in range(n)]
    assert read(loss_mask_prefix(packed)) == [mark_stream[i * 64:(i + 1) * 64] for i in range(n)]
    validate_loss_mask(packed)


@pytest.mark.parametrize("spans, fragment", [
    ([[3, 2]], "0 <= start < end"),
    ([[0, 99]], "<= 13"),
    ([[0, 1, 2]], "[start, end)"),
    ([[True, 2]], "[start, end)"),
    ("0-3", "not a list"),
])
def test_bad_spans_name_the_line_and_the_rule(tmp_path, spans, fragment):
    rows = [{"text": "ok = 1", "answers": [[5, 6]]}, {"text": "bad one = 2! ", "answers": spans}]
    with pytest.raises(PreprocessError) as e:
        preprocess(tmp_path, rows)
    assert ":2:" in str(e.value) and fragment in str(e.value) and "--skip-bad-lines" in str(e.value)
    prefix, stats, _ = preprocess(tmp_path, rows, name="skipping", skip_bad_lines=True)
    assert stats.bad == 1 and read(loss_mask_prefix(prefix)) == [[0, 0, 0, 0, 0, 1, 1]]


def test_a_missing_spans_field_and_impossible_options_are_refused(tmp_path):
    with pytest.raises(PreprocessError, match="no key 'answers'.*\\[\\] for none"):
        preprocess(tmp_path, [{"text": "x"}])
    for kw, fragment in (({"json_keys": ("text", "title")}, "give one key"),
                         ({"split_sentences": True}, "cannot be combined"),
                         ({"loss_spans_key": "text"}, "also the text key")):
        with pytest.raises(PreprocessError, match=fragment):
            preprocess(tmp_path, qa_rows(2), **kw)


@pytest.mark.parametrize("seq_length", [16, 37])
def test_samples_score_exactly_the_marked_tokens(tmp_path, seq_length):
    """Windows cut documents anywhere (37) and span several of them: the loss is on a label iff it
    is an answer digit (the only digits of these documents) or the end of a document whose last
    answer ends its text, and on nothing else."""
    prefix, _, _ = preprocess(tmp_path, qa_rows(400, seed=2))
    train, valid, _ = build_gpt_datasets([prefix], "90,10,0", seq_length, 5, [300, 20, None],
                                         str(tmp_path / "cache"), TOK, loss_on_spans=True)
    digits = set(b"0123456789")
    crossing = 0
    for ds in (train, valid):
        for i in range(len(ds)):
            s = ds[i]
            # ... and on the end of a document that ends with an answer
            want = [float(int(t) in digits or (int(t) == TOK.eod and int(x) in digits))
                    for x, t in zip(s["tokens"], s["labels"])]
            assert s["loss_mask"].tolist() == want, i
            crossing += int((s["tokens"] == TOK.eod).any())
    assert crossing > 100  # most windows hold the end of one document and the start of another
    plain = build_gpt_datasets([prefix], "90,10,0", seq_length, 5, [300, 20, None], str(tmp_path / "cache"), TOK)[0]
    assert all(plain[i]["tokens"].equal(train[i]["tokens"]) for i in range(50))  # the same samples


def test_a_missing_mismatched_or_damaged_mask_is_refused_before_training(tmp_path):
    a, _, _ = preprocess(tmp_path, qa_rows(30, seed=3), name="a")
    b, _, _ = preprocess(tmp_path, qa_rows(31, seed=4), name="b")
    plain = PreprocessConfig(input=str(tmp_path / "a.jsonl"), output_prefix=str(tmp_path / "plain"),
                             tokenizer_type="ByteTokenizer", append_eod=True, log_interval=0)
    run_preprocess(plain, log=quiet)
    with pytest.raises(DatasetFileError, match="has no loss mask.*--loss-spans-key"):
        build_gpt_datasets([plain.output_prefix_for("text")], "1,0,0", 16, 1, [4, None, None], None, TOK,
                           loss_on_spans=True)
    for ext in (".bin", ".idx"):  # b's mask beside a's tokens
        os.replace(loss_mask_prefix(b) + ext, loss_mask_prefix(a) + ext)
    with pytest.raises(DatasetFileError, match="does not describe the documents"):
        validate_loss_mask(a)
    c, _, _ = preprocess(tmp_path, qa_rows(30, seed=3), name="c")
    with open(loss_mask_prefix(c) + ".bin", "r+b") as f:
        f.seek(5)
        f.write(b"\x07")
    with pytest.raises(DatasetFileError, match="holds 7 at position 5"):
        validate_loss_mask(c)
    empty, _, _ = preprocess(tmp_path, [{"text": "no answers", "answers": []}] * 5, name="empty")
    with pytest.raises(DatasetFileError, match="marks no token"):
        validate_loss_mask(empty)


def _pretrain(tmp_path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "megatron_rwkvx.pretrain", "--device", "cpu", "--tokenizer-type", "ByteTokenizer",
           "--layer-pattern", "RR", "--hidden-size", "32", "--head-size", "16", "--seq-length", "32",
           "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--lr", "1e-3",
           "--split", "90,10,0", "--eval-iters", "1", "--eval-interval", "2", "--log-interval", "1", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_pretrain_trains_on_the_spans_and_says_so(tmp_path):
    prefix, _, _ = preprocess(tmp_path, qa_rows(200, seed=5))
    spans = _pretrain(tmp_path, "--data-path", prefix, "--loss-on-spans")
    assert spans.returncode == 0, spans.stdout[-2000:] + spans.stderr[-2000:]
    out = spans.stdout + spans.stderr
    assert "loss: on the tokens that each dataset's loss mask marks" in out
    every = _pretrain(tmp_path, "--data-path", prefix)
    assert every.returncode == 0, every.stderr[-2000:]
    assert "has a loss mask" in every.stdout + every.stderr and "--loss-on-spans" in every.stdout + every.stderr
    refused = _pretrain(tmp_path, "--mock-data", "--loss-on-spans")
    assert refused.returncode != 0 and "--loss-on-spans needs datasets with loss masks" in refused.stderr
