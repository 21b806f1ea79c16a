"""tools/preprocess_data.py as Megatron-LM's: empty documents, sentence splitting, GPT-2 BPE and
NullTokenizer inputs.

The expected bytes follow Megatron-LM core_v0.16.1's tools/preprocess_data.py rule, replayed here
with the same megatron-core IndexedDatasetBuilder it uses: each sentence (the whole text without
--split-sentences) is tokenized alone, empty ones are dropped, --append-eod adds the end of
document to the last one, and ``add_document(ids, sentence_lengths)`` is called for every
document, an empty one included (a document of no sequences).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_rwkvx.data import preprocess
from megatron_rwkvx.data.indexed import validate_indexed_dataset
from megatron_rwkvx.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess
from megatron_rwkvx.data.tokenizers import TokenizerError, build_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import preprocess_data  # noqa: E402

DOCS = ["First document. It has two sentences.", "", "Third one!  And more? Yes.", "", "", "last"]


def _jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return str(path)


def _megatron_lm_rule(prefix, texts, tok, split=None, append_eod=True):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for text in texts:
        ids, lengths = [], []
        for sentence in (split(text) if split else [text]):
            sentence_ids = tok.tokenize(sentence)
            if len(sentence_ids) > 0:
                ids.extend(sentence_ids)
                lengths.append(len(sentence_ids))
        if len(ids) > 0 and append_eod:
            ids.append(tok.eod)
            lengths[-1] += 1
        builder.add_document(np.array(ids, dtype=np.int64), lengths)
    builder.finalize(prefix + ".idx")
    return prefix


def _ours(tmp_path, texts, **kw):
    cfg = PreprocessConfig(input=_jsonl(tmp_path / "in.jsonl", texts), output_prefix=str(tmp_path / "out"),
                           tokenizer_type="ByteTokenizer", append_eod=True, log_interval=0, **kw)
    stats = run_preprocess(cfg, log=lambda m: None)
    return cfg.output_prefix_for("text"), stats


def _same_files(a, b):
    for ext in (".bin", ".idx"):
        with open(a + ext, "rb") as fa, open(b + ext, "rb") as fb:
            assert fa.read() == fb.read(), ext


def test_empty_documents_give_megatron_lm_bytes(tmp_path):
    ours, stats = _ours(tmp_path, DOCS)
    expected = _megatron_lm_rule(str(tmp_path / "expected"), DOCS, build_tokenizer("ByteTokenizer"))
    _same_files(ours, expected)
    info = validate_indexed_dataset(ours)
    assert (info.num_documents, info.num_sequences) == (6, 3) and stats.empty["text"] == 3


def test_empty_documents_can_be_dropped(tmp_path):
    ours, stats = _ours(tmp_path, DOCS, drop_empty_documents=True)
    assert validate_indexed_dataset(ours).num_documents == 3 and stats.empty["text"] == 3


def _toy_splitter():
    """An untrained punkt model: the real one is a download (nltk's punkt data)."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer().tokenize


def test_split_sentences_gives_one_sequence_per_sentence(tmp_path, monkeypatch):
    pytest.importorskip("nltk")
    monkeypatch.setattr(preprocess, "load_sentence_splitter", lambda lang, keep_newlines: _toy_splitter())
    ours, _ = _ours(tmp_path, DOCS, split_sentences=True)
    expected = _megatron_lm_rule(str(tmp_path / "expected"), DOCS, build_tokenizer("ByteTokenizer"), _toy_splitter())
    _same_files(ours, expected)
    assert validate_indexed_dataset(ours).num_sequences == 6  # 2 + 3 + 1 sentences


def test_split_sentences_without_punkt_is_a_clear_error(tmp_path, monkeypatch):
    nltk = pytest.importorskip("nltk")

    def missing(name):
        raise LookupError(f"Resource {name} not found")

    monkeypatch.setattr(nltk, "load", missing)
    with pytest.raises(PreprocessError, match="punkt model for 'english'.*nltk.download"):
        _ours(tmp_path, DOCS, split_sentences=True)


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """A small GPT-2-format vocab.json / merges.txt trained here (byte-level BPE)."""
    tokenizers = pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("gpt2")
    trainer = tokenizers.ByteLevelBPETokenizer(add_prefix_space=False)
    text = ["The quick brown fox jumps over the lazy dog. " * 20, "Hello world, it's 2026 and we're here."]
    trainer.train_from_iterator(text, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    trainer.save_model(str(d))
    return str(d / "vocab.json"), str(d / "merges.txt")


def test_gpt2_bpe_from_local_files(tmp_path, gpt2_files):
    vocab, merges = gpt2_files
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    assert tok.eod == json.load(open(vocab))["<|endoftext|>"] and tok.vocab_size == len(json.load(open(vocab)))
    text = "The lazy dog's 2026 jumps,  over\nthe fox"
    assert tok.detokenize(tok.tokenize(text)) == text
    # GPT-2's pattern keeps " lazy" (space + letters) apart from "'s" and digits.
    pieces = [tok.detokenize([i]) for i in tok.tokenize(" lazy dog's")]
    assert "".join(pieces) == " lazy dog's" and "'s" in pieces[-1]
    out = str(tmp_path / "gpt2")
    rc = preprocess_data.main(["--input", _jsonl(tmp_path / "in.jsonl", ["Hello world.", "", "fox"]),
                               "--output-prefix", out, "--tokenizer-type", "GPT2BPETokenizer",
                               "--vocab-file", vocab, "--merge-file", merges, "--append-eod", "--log-interval", "0",
                               "--keep-sequential-samples"])
    assert rc == 0
    assert validate_indexed_dataset(out + "_text_document").num_documents == 3
    with pytest.raises(TokenizerError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab)


def test_null_tokenizer_reads_ids():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert (tok.vocab_size, tok.eod) == (101, 100)
    assert tok.tokenize("3 14 15\n92") == [3, 14, 15, 92]
    with pytest.raises(ValueError, match="outside 0..99"):
        tok.tokenize("5 100")
    with pytest.raises(TokenizerError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")
