"""RWKV World tokenizer: the reference trie's ids on mixed text, exact round trips, clear errors."""
from __future__ import annotations

import inspect
import json
import random
import textwrap

import numpy as np
import pytest

from megatron_rwkvx.data import rwkv_trie
from megatron_rwkvx.data.tokenizers import RWKVWorldTokenizer, build_tokenizer

rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")


@pytest.fixture(scope="module")
def reference():
    return rwkv_tokenizer.TRIE_TOKENIZER(rwkv_trie.world_vocab_path())


@pytest.fixture(scope="module")
def tok():
    return RWKVWorldTokenizer()


def mixed_corpus(seed: int = 0) -> bytes:
    """English prose, code, CJK, emoji, long runs (the 128-byte space token) and invalid bytes."""
    rng = random.Random(seed)
    parts = [inspect.getdoc(m) or "" for m in (json, random, textwrap, inspect)]
    parts += [inspect.getsource(m) for m in (textwrap, json.decoder, json.encoder, random)]
    parts += ["中文分词测试：人工智能正在改变世界。日本語のテキストです。한국어 문장입니다。" * 40]
    parts += ["emoji 😀🎉👩‍👩‍👧‍👦🏳️‍🌈 mixed with text ✨🚀 " * 40]
    parts += [" " * 300, "\t\t\n\n\r\n" * 50, "-" * 200 + "#" * 170, "\x00\x01\x7f"]
    blob = "\n".join(parts).encode("utf-8")
    noise = bytes(rng.randrange(256) for _ in range(20000))  # random bytes: mostly invalid UTF-8
    cut = [blob[i:i + 997] for i in range(0, len(blob), 997)]
    cut += [b"\xff\xfe\xc3(\xe2\x82\xa0\xed\xa0\x80", noise, "é".encode("latin-1") * 30, b"\xf0\x9f\x98"]
    rng.shuffle(cut)
    return b"".join(cut)


def test_vocabulary_facts(tok):
    assert tok.vocab_size == 65536 and tok.eod == 0
    assert tok.tokenize("") == []
    assert tok.detokenize([0]) == ""


def test_equals_reference_on_mixed_corpus(tok, reference):
    data = mixed_corpus()
    assert len(data) > 100_000
    ours = tok.tokenize_bytes(data)
    assert ours.dtype == np.int32
    assert ours.tolist() == reference.encodeBytes(data)
    assert tok.detokenize_bytes(ours) == data


def test_python_fallback_equals_reference(tok, reference):
    trie = rwkv_trie.load_flat_trie(rwkv_trie.world_vocab_path())
    data = mixed_corpus(seed=1)[:30000]
    assert trie.encode(data, use_c=False).tolist() == reference.encodeBytes(data)


@pytest.mark.skipif(not rwkv_trie.c_extension_available(), reason="C extension not built")
def test_c_and_python_paths_agree_on_random_bytes():
    trie = rwkv_trie.load_flat_trie(rwkv_trie.world_vocab_path())
    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 17, 200, 5000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert trie.encode(data, use_c=True).tolist() == trie.encode(data, use_c=False).tolist()


def test_str_round_trip_is_exact(tok, reference):
    text = "Hello, world! 你好，世界 🌍\n\tdef f(x):\n        return x ** 2  # ünïcödé\r\n"
    ids = tok.tokenize(text)
    assert ids == reference.encode(text)
    assert tok.detokenize(ids) == text
    # Undecodable bytes carried as surrogate escapes come back as the same bytes.
    raw = b"valid \xff\xfe then \xc3 broken"
    escaped = raw.decode("utf-8", errors="surrogateescape")
    assert tok.detokenize_bytes(tok.tokenize(escaped)) == raw
    assert tok.detokenize(tok.tokenize(escaped)) == escaped


def test_lone_surrogate_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.tokenize("abc\ud83d")


def test_unknown_id_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="65535 is not in the vocabulary"):
        tok.detokenize([100, 65535])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.detokenize([-1])


def test_build_tokenizer_errors(tmp_path):
    from megatron_rwkvx.data.tokenizers import TokenizerError

    with pytest.raises(TokenizerError, match="unknown tokenizer type 'BertWordPieceLowerCase'"):
        build_tokenizer("BertWordPieceLowerCase")
    with pytest.raises(TokenizerError, match="does not exist"):
        build_tokenizer("RWKVWorldTokenizer", str(tmp_path / "missing.txt"))
    bad = tmp_path / "vocab.txt"
    bad.write_text("1 'a' 1\n2 'bc' 5\n")
    with pytest.raises(TokenizerError, match="stated byte length 5"):
        build_tokenizer("RWKVWorldTokenizer", str(bad))


def test_vocabulary_without_a_byte_is_reported(tmp_path):
    small = tmp_path / "vocab.txt"
    small.write_text("1 'a' 1\n2 'b' 1\n3 'ab' 2\n")
    tok = build_tokenizer("RWKVWorldTokenizer", str(small))
    assert tok.tokenize("abba") == [3, 2, 1]
    with pytest.raises(ValueError, match="no vocabulary token starts with byte 0x63"):
        tok.tokenize("abc")
