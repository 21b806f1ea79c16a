"""SentencePiece and Hugging Face tokenizers behind build_tokenizer, from files made in the test."""
from __future__ import annotations

import io

import pytest

from megatron_rwkvx.data.tokenizers import TokenizerError, build_tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.",
    "How vexingly quick daft zebras jump!",
    "Sphinx of black quartz, judge my vow.",
] * 50


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    path = tmp_path_factory.mktemp("sp") / "tok.model"
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=buf, vocab_size=40,
                                   minloglevel=2)
    path.write_bytes(buf.getvalue())
    return str(path)


def test_sentencepiece_round_trip(sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    assert tok.vocab_size == 40 and tok.eod == 2
    text = "The quick brown fox judges my vow."
    ids = tok.tokenize(text)
    assert all(0 <= i < 40 for i in ids) and tok.detokenize(ids) == text
    assert tok.unique_identifiers["class"] == "SentencePieceTokenizer"


def test_sentencepiece_errors(tmp_path):
    with pytest.raises(TokenizerError, match="needs --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(TokenizerError, match="does not exist"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "none.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="cannot load"):
        build_tokenizer("SentencePieceTokenizer", str(junk))


def _hf_tokenizer_file(tmp_path, with_eod=True):
    tokenizers = pytest.importorskip("tokenizers")
    words = sorted({w for s in SENTENCES for w in s.replace(".", " .").replace("!", " !").replace(",", " ,").split()})
    vocab = {w: i for i, w in enumerate(["[UNK]"] + words + (["<|endoftext|>"] if with_eod else []))}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path, vocab


def test_huggingface_tokenizer_file_and_directory(tmp_path):
    path, vocab = _hf_tokenizer_file(tmp_path)
    for model in (str(path), str(tmp_path)):
        tok = build_tokenizer("HuggingFaceTokenizer", model)
        assert tok.vocab_size == len(vocab) and tok.eod == vocab["<|endoftext|>"]
        ids = tok.tokenize("Pack my box with five dozen liquor jugs .")
        assert ids == [vocab[w] for w in "Pack my box with five dozen liquor jugs .".split()]
        assert tok.detokenize(ids) == "Pack my box with five dozen liquor jugs ."


def test_huggingface_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "nothing.json"))
    path, _ = _hf_tokenizer_file(tmp_path, with_eod=False)
    with pytest.raises(TokenizerError, match="none of the end-of-document tokens"):
        build_tokenizer("HuggingFaceTokenizer", str(path))
