"""Greedy longest-match byte tokenization over the RWKV World vocabulary.

The reference (``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``) walks a trie of Python objects one byte at
a time. Here the trie is flattened into four numpy arrays (nodes in (length, bytes) order, so the
children of a node are contiguous and sorted) and walked by a small C function
(``_rwkv_trie.c``) when it is built, or by an equivalent pure-Python loop otherwise. Both return
exactly the reference ids: at each position, the longest vocabulary entry that is a prefix of the
remaining bytes.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import os
import warnings
from typing import Iterable, List, Optional, Sequence

import numpy as np

try:  # built by setup.py when a C compiler is present; see docs/data.md
    from megatron_rwkvx.data import _rwkv_trie as _c_trie
except ImportError:  # pragma: no cover - depends on the build
    _c_trie = None

WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"


class VocabularyError(ValueError):
    """The vocabulary file is missing or malformed."""


def world_vocab_path() -> str:
    """Path of the World vocabulary shipped in the installed ``rwkv`` package (not imported)."""
    spec = importlib.util.find_spec("rwkv")
    if spec is None or not spec.submodule_search_locations:
        raise VocabularyError(
            "the RWKV World vocabulary comes from the 'rwkv' package, which is not installed: "
            "run `pip install rwkv` or pass --tokenizer-model /path/to/" + WORLD_VOCAB_FILE
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, WORLD_VOCAB_FILE)
        if os.path.isfile(path):
            return path
    raise VocabularyError(
        f"the installed 'rwkv' package has no {WORLD_VOCAB_FILE}: reinstall it "
        f"(`pip install --force-reinstall rwkv`) or pass --tokenizer-model /path/to/{WORLD_VOCAB_FILE}"
    )


def read_vocab(path: str) -> List[tuple]:
    """``[(id, token_bytes)]`` from a file of lines ``<id> <python str/bytes literal> <byte length>``."""
    if not os.path.isfile(path):
        raise VocabularyError(f"vocabulary file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = [(n, line.rstrip("\n")) for n, line in enumerate(f, 1) if line.strip()]
    parsed = []
    for lineno, line in lines:
        try:
            first, last = line.index(" "), line.rindex(" ")
            parsed.append((lineno, int(line[:first]), line[first + 1:last], int(line[last + 1:])))
        except ValueError:
            raise VocabularyError(
                f"{path}:{lineno}: expected '<id> <str or bytes literal> <length>', got {line[:80]!r}"
            ) from None
    try:  # one parse for the whole file is several times faster than one per line
        literals = ast.literal_eval("[" + ",".join(p[2] for p in parsed) + "]")
    except (ValueError, SyntaxError):
        literals = None
    if literals is None or len(literals) != len(parsed):
        literals = []
        for lineno, _, text, _ in parsed:
            try:
                literals.append(ast.literal_eval(text))
            except (ValueError, SyntaxError):
                raise VocabularyError(f"{path}:{lineno}: {text[:80]!r} is not a str or bytes literal") from None
    entries = []
    for (lineno, idx, _, length), token in zip(parsed, literals):
        if isinstance(token, str):
            token = token.encode("utf-8")
        if not isinstance(token, bytes) or len(token) != length or not token:
            raise VocabularyError(f"{path}:{lineno}: token {token!r} does not have the stated byte length {length}")
        entries.append((idx, token))
    if not entries:
        raise VocabularyError(f"vocabulary file {path!r} is empty")
    ids = [i for i, _ in entries]
    if len(set(ids)) != len(ids) or min(ids) < 1:
        raise VocabularyError(f"{path}: token ids must be unique and >= 1 (0 is end of document)")
    if len({t for _, t in entries}) != len(entries):
        raise VocabularyError(f"{path}: the same token bytes appear under two ids")
    return entries


class FlatTrie:
    """The vocabulary as four arrays (see module docstring) plus the id -> bytes table."""

    def __init__(self, entries: Sequence[tuple]):
        token_of = {t: i for i, t in entries}
        prefixes = {t[:k] for t in token_of for k in range(1, len(t) + 1)}
        # (length, bytes) order puts the children of each node next to each other, sorted by byte.
        nodes = [b""] + sorted(prefixes, key=lambda p: (len(p), p))
        node_of = {p: n for n, p in enumerate(nodes)}
        count = len(nodes)
        first_child = [0] * count
        n_children = [0] * count
        for n in range(1, count):
            parent = node_of[nodes[n][:-1]]
            if n_children[parent] == 0:
                first_child[parent] = n
            n_children[parent] += 1
        self.node_byte = np.array([0] + [p[-1] for p in nodes[1:]], np.uint8)
        self.first_child = np.array(first_child, np.int32)
        self.n_children = np.array(n_children, np.int32)
        self.token_id = np.array([token_of.get(p, 0) for p in nodes], np.int32)
        self.max_id = max(token_of.values())
        self.id_to_bytes: List[Optional[bytes]] = [None] * (self.max_id + 1)
        for t, i in token_of.items():
            self.id_to_bytes[i] = t
        self.id_to_bytes[0] = b""  # end of document: no text
        self._py_root = None

    # -- encoding ---------------------------------------------------------------------------------
    def encode(self, data: bytes, use_c: Optional[bool] = None) -> np.ndarray:
        """int32 ids of ``data``; ``use_c`` None picks the C walk when it is built."""
        if use_c is None:
            use_c = _c_trie is not None
        if use_c:
            if _c_trie is None:
                raise RuntimeError("the C tokenizer extension is not built (see docs/data.md)")
            out = np.empty(len(data), np.int32)
            n = _c_trie.encode(data, self.node_byte, self.first_child, self.n_children, self.token_id, out)
            if n < 0:
                self._no_token_at(data, -n - 1)
            return out[:n]
        return np.asarray(self._encode_python(bytes(data)), dtype=np.int32)

    def _python_trie(self):
        # Nested dicts, built on first use: the fallback walk does one dict lookup per byte.
        if self._py_root is None:
            count = len(self.node_byte)
            nodes = [[int(t), {}] for t in self.token_id.tolist()]
            first, n_child, byte = self.first_child.tolist(), self.n_children.tolist(), self.node_byte.tolist()
            for v in range(count):
                children = nodes[v][1]
                for c in range(first[v], first[v] + n_child[v]):
                    children[byte[c]] = nodes[c]
            self._py_root = nodes[0]
        return self._py_root

    def _encode_python(self, data: bytes) -> List[int]:
        root = self._python_trie()
        out = []
        append = out.append
        pos, end = 0, len(data)
        while pos < end:
            node, j, best, best_end = root, pos, 0, pos
            while j < end:
                node = node[1].get(data[j])
                if node is None:
                    break
                j += 1
                if node[0]:
                    best, best_end = node[0], j
            if best_end == pos:
                self._no_token_at(data, pos)
            append(best)
            pos = best_end
        return out

    @staticmethod
    def _no_token_at(data: bytes, pos: int):
        raise VocabularyError(
            f"no vocabulary token starts with byte 0x{data[pos]:02x} (input offset {pos}): the "
            "vocabulary must contain all 256 single bytes to tokenize arbitrary text"
        )

    # -- decoding ---------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int]) -> bytes:
        ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
        table = self.id_to_bytes
        try:
            if ids and min(ids) < 0:  # a negative index would silently pick a token from the end
                raise IndexError
            return b"".join([table[i] for i in ids])
        except (TypeError, IndexError):
            bad = next(i for i in ids if not (0 <= i <= self.max_id) or table[i] is None)
            raise ValueError(
                f"token id {bad} is not in the vocabulary (ids are 0 = end of document and "
                f"{min(i for i, t in enumerate(table) if t)}..{self.max_id})"
            ) from None


@functools.lru_cache(maxsize=4)
def load_flat_trie(path: str) -> FlatTrie:
    """Built once per process and vocabulary file (about a second for the World vocabulary)."""
    return FlatTrie(read_vocab(path))


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read(), usedforsecurity=False).hexdigest()


def c_extension_available() -> bool:
    return _c_trie is not None


def warn_if_slow() -> None:
    if _c_trie is None:
        warnings.warn(
            "megatron_rwkvx.data._rwkv_trie (C) is not built: the RWKV World tokenizer runs in pure "
            "Python (same ids, about 10x slower). Reinstall with a C compiler present: pip install -e .",
            RuntimeWarning,
            stacklevel=3,
        )
