"""Tokenizers for preprocessing and training: RWKV World, SentencePiece, Hugging Face, bytes.

All of them expose ``vocab_size``, ``eod``, ``tokenize(text) -> list[int]`` and ``detokenize(ids)
-> str``, plus ``unique_identifiers`` (megatron-core's dataset cache key includes the tokenizer).
They deliberately have no ``pad`` attribute: megatron-core's ``GPTDataset`` then pads with -1,
an id no dataset contains, instead of masking real end-of-document tokens.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Iterable, List, Optional

import numpy as np

from megatron_rwkvx.data import rwkv_trie
from megatron_rwkvx.errors import UsageError

TOKENIZER_TYPES = ("RWKVWorldTokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer", "ByteTokenizer",
                   "GPT2BPETokenizer", "NullTokenizer")


class TokenizerError(UsageError):
    """A tokenizer cannot be built as asked (unknown type, missing or unreadable model)."""


def _as_list(ids) -> List[int]:
    return ids.tolist() if isinstance(ids, np.ndarray) else list(ids)


class RWKVWorldTokenizer:
    """Greedy longest byte match over ``rwkv_vocab_v20230424.txt``: the reference ids, faster.

    Text is encoded to UTF-8 with ``surrogateescape``, so a ``str`` that was decoded from
    arbitrary bytes with ``errors="surrogateescape"`` tokenizes to exactly those bytes, and
    ``detokenize`` (which decodes the same way) gives that ``str`` back. ``tokenize_bytes`` /
    ``detokenize_bytes`` work on raw bytes. Id 0 is end of document and decodes to nothing.
    """

    vocab_size = 65536  # embedding rows of the official models; the file has ids 1..65529
    eod = 0

    def __init__(self, vocab_file: Optional[str] = None):
        self.vocab_file = os.path.abspath(vocab_file) if vocab_file else rwkv_trie.world_vocab_path()
        try:
            self._trie = rwkv_trie.load_flat_trie(self.vocab_file)
        except rwkv_trie.VocabularyError as e:
            raise TokenizerError(f"RWKVWorldTokenizer: {e}") from e
        if self._trie.max_id >= self.vocab_size:
            raise TokenizerError(
                f"RWKVWorldTokenizer: {self.vocab_file} has token id {self._trie.max_id}, beyond the "
                f"{self.vocab_size}-row World embedding"
            )
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("vocab_md5", rwkv_trie.file_digest(self.vocab_file))]
        )
        rwkv_trie.warn_if_slow()

    def tokenize_bytes(self, data: bytes) -> np.ndarray:
        return self._trie.encode(data)

    def tokenize_array(self, text: str) -> np.ndarray:
        """int32 numpy ids (the preprocessing path: no Python list in between)."""
        return self._trie.encode(self._encode_text(text))

    def tokenize(self, text: str) -> List[int]:
        return self.tokenize_array(text).tolist()

    def detokenize_bytes(self, ids: Iterable[int]) -> bytes:
        return self._trie.decode(ids)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._trie.decode(ids).decode("utf-8", errors="surrogateescape")

    @staticmethod
    def _encode_text(text: str) -> bytes:
        try:
            return text.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"text has the lone surrogate {text[e.start]!r} at character {e.start}, which has no "
                "UTF-8 encoding (only U+DC80..U+DCFF, Python's escapes for undecodable bytes, are "
                "accepted); fix the source text or use tokenize_bytes"
            ) from None


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file; end of document is its ``</s>`` (eos) id."""

    def __init__(self, model_file: Optional[str]):
        if not model_file:
            raise TokenizerError("SentencePieceTokenizer needs --tokenizer-model path/to/tokenizer.model")
        if not os.path.isfile(model_file):
            raise TokenizerError(f"SentencePieceTokenizer: model file {model_file!r} does not exist")
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"SentencePieceTokenizer: cannot load {model_file!r} ({e})") from e
        self.vocab_size = int(self._sp.vocab_size())
        eos = int(self._sp.eos_id())
        if eos < 0:
            raise TokenizerError(
                f"SentencePieceTokenizer: {model_file!r} defines no end-of-sentence piece (eos_id = -1); "
                "train it with --eos_id set (the default is 2)"
            )
        self.eod = eos
        with open(model_file, "rb") as f:
            import hashlib

            digest = hashlib.md5(f.read(), usedforsecurity=False).hexdigest()
        self.unique_identifiers = OrderedDict([("class", type(self).__name__), ("model_md5", digest)])

    def tokenize(self, text: str) -> List[int]:
        return list(self._sp.encode(text))

    def tokenize_array(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def detokenize(self, ids) -> str:
        return self._sp.decode(_as_list(ids))


_HF_EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")


class HuggingFaceTokenizer:
    """A Hugging Face ``tokenizer.json`` (or a directory holding one), through ``tokenizers``.

    End of document is the first of ``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ``<eos>``,
    ``<|eot_id|>``, ``[SEP]`` found in the vocabulary, or ``eod_token`` when given.
    """

    def __init__(self, model: Optional[str], eod_token: Optional[str] = None):
        if not model:
            raise TokenizerError("HuggingFaceTokenizer needs --tokenizer-model path/to/tokenizer.json (or its directory)")
        path = os.path.join(model, "tokenizer.json") if os.path.isdir(model) else model
        if not os.path.isfile(path):
            raise TokenizerError(
                f"HuggingFaceTokenizer: {path!r} does not exist (give a tokenizer.json file or a "
                "directory with one; hub names are not downloaded here)"
            )
        try:
            import tokenizers
        except ImportError as e:
            raise TokenizerError("HuggingFaceTokenizer needs the 'tokenizers' package: pip install tokenizers") from e
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"HuggingFaceTokenizer: cannot load {path!r} ({e})") from e
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        candidates = (eod_token,) if eod_token else _HF_EOD_CANDIDATES
        eod = next((self._tok.token_to_id(t) for t in candidates if self._tok.token_to_id(t) is not None), None)
        if eod is None:
            raise TokenizerError(
                f"HuggingFaceTokenizer: {path!r} has none of the end-of-document tokens {list(candidates)}; "
                "add one to the tokenizer or pass eod_token"
            )
        self.eod = int(eod)
        with open(path, "rb") as f:
            import hashlib

            digest = hashlib.md5(f.read(), usedforsecurity=False).hexdigest()
        self.unique_identifiers = OrderedDict([("class", type(self).__name__), ("tokenizer_md5", digest)])

    def tokenize(self, text: str) -> List[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def tokenize_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def detokenize(self, ids) -> str:
        return self._tok.decode(_as_list(ids), skip_special_tokens=False)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and end of document 256: a 257-row vocabulary with no model file.

    For small models on synthetic or mixed text (the retrieval study), where a 65K-row embedding
    and head would dwarf the network. Text is encoded with ``surrogateescape`` like RWKV World, so
    any byte string round-trips; the end-of-document id decodes to nothing.
    """

    vocab_size = 257
    eod = 256
    unique_identifiers = OrderedDict([("class", "ByteTokenizer"), ("eod", 256)])

    def tokenize_array(self, text: str) -> np.ndarray:
        return np.frombuffer(RWKVWorldTokenizer._encode_text(text), dtype=np.uint8).astype(np.int32)

    def tokenize(self, text: str) -> List[int]:
        return list(RWKVWorldTokenizer._encode_text(text))

    def detokenize(self, ids: Iterable[int]) -> str:
        data = bytes(i for i in _as_list(ids) if i != self.eod)
        return data.decode("utf-8", errors="surrogateescape")


class GPT2BPETokenizer:
    """GPT-2's byte-level BPE from a local ``vocab.json`` and ``merges.txt`` (Megatron-LM's
    --vocab-file / --merge-file), through ``tokenizers``' byte-level BPE, which splits text with
    GPT-2's own pattern. ``<|endoftext|>`` is the end of document; in text it is ordinary text,
    as in GPT-2's encoder."""

    def __init__(self, vocab_file: Optional[str], merge_file: Optional[str]):
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path:
                raise TokenizerError(f"GPT2BPETokenizer needs {flag} (GPT-2's vocab.json and merges.txt)")
            if not os.path.isfile(path):
                raise TokenizerError(f"GPT2BPETokenizer: {flag} {path!r} does not exist")
        try:
            import tokenizers
        except ImportError as e:
            raise TokenizerError("GPT2BPETokenizer needs the 'tokenizers' package: pip install tokenizers") from e
        try:
            self._tok = tokenizers.ByteLevelBPETokenizer(vocab_file, merge_file, add_prefix_space=False)
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"GPT2BPETokenizer: cannot load {vocab_file!r} / {merge_file!r} ({e})") from e
        vocab = self._tok.get_vocab()
        if "<|endoftext|>" not in vocab:
            raise TokenizerError(f"GPT2BPETokenizer: {vocab_file!r} has no <|endoftext|> (end of document)")
        self.vocab_size = len(vocab)
        self.eod = int(vocab["<|endoftext|>"])
        import hashlib

        digest = hashlib.md5(usedforsecurity=False)
        for path in (vocab_file, merge_file):
            with open(path, "rb") as f:
                digest.update(f.read())
        self.unique_identifiers = OrderedDict([("class", type(self).__name__), ("files_md5", digest.hexdigest())])

    def tokenize(self, text: str) -> List[int]:
        return list(self._tok.encode(text).ids)

    def tokenize_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

    def detokenize(self, ids) -> str:
        return self._tok.decode(_as_list(ids), skip_special_tokens=False)


class NullTokenizer:
    """Megatron-LM's NullTokenizer: the text is already ids, written as space-separated integers;
    ``vocab_size`` ids plus the end of document ``vocab_size``."""

    def __init__(self, vocab_size: Optional[int]):
        if not vocab_size or vocab_size < 1:
            raise TokenizerError("NullTokenizer needs --vocab-size (the ids in the text are below it)")
        self.eod = int(vocab_size)
        self.vocab_size = int(vocab_size) + 1
        self.unique_identifiers = OrderedDict([("class", "NullTokenizer"), ("vocab_size", self.vocab_size)])

    def tokenize_array(self, text: str) -> np.ndarray:
        try:
            ids = np.asarray([int(w) for w in text.split()], dtype=np.int64)
        except ValueError as e:
            raise ValueError(f"NullTokenizer reads space-separated integer ids: {e}") from None
        if ids.size and (ids.min() < 0 or ids.max() >= self.eod):
            raise ValueError(f"NullTokenizer: id {int(ids.max() if ids.max() >= self.eod else ids.min())} "
                             f"is outside 0..{self.eod - 1} (--vocab-size {self.eod})")
        return ids.astype(np.int32)

    def tokenize(self, text: str) -> List[int]:
        return self.tokenize_array(text).tolist()

    def detokenize(self, ids) -> str:
        return " ".join(str(i) for i in _as_list(ids) if i != self.eod)


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None, *, vocab_file: Optional[str] = None,
                    merge_file: Optional[str] = None, vocab_size: Optional[int] = None):
    """The tokenizer named by ``tokenizer_type`` (one of ``TOKENIZER_TYPES``).

    ``tokenizer_model``: for RWKV World an optional vocabulary file (default: the one in the
    installed ``rwkv`` package); for SentencePiece the ``.model`` file; for Hugging Face a
    ``tokenizer.json`` or its directory. GPT-2 BPE takes ``vocab_file`` and ``merge_file``, the
    NullTokenizer ``vocab_size``.
    """
    if tokenizer_type == "RWKVWorldTokenizer":
        if tokenizer_model is not None and not os.path.isfile(tokenizer_model):
            raise TokenizerError(f"RWKVWorldTokenizer: vocabulary file {tokenizer_model!r} does not exist")
        return RWKVWorldTokenizer(tokenizer_model)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "ByteTokenizer":
        if tokenizer_model is not None:
            raise TokenizerError("ByteTokenizer takes no --tokenizer-model (its vocabulary is the 256 bytes + end of document)")
        return ByteTokenizer()
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise TokenizerError(f"unknown tokenizer type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
