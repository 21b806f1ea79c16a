"""Checks on Megatron indexed datasets (``.bin`` + ``.idx``) that megatron-core does not make.

megatron-core's ``IndexedDataset`` memory-maps a ``.bin`` without comparing its size to the
index, so a truncated file fails (or returns garbage) only when a sample reaches the missing
part, possibly hours into training, and trusts the index's arrays as they are.
``validate_indexed_dataset`` checks sizes and the index's own consistency up front;
``check_token_ids`` checks every id against the model's vocabulary. A dataset may carry a loss
mask beside it (``loss_mask_prefix``: one 0/1 byte per token, written by ``preprocess_data.py
--loss-spans-key``); ``validate_loss_mask`` checks that it describes the same documents.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from megatron_rwkvx.errors import UsageError

INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8


class DatasetFileError(UsageError):
    """An indexed dataset is missing, truncated, inconsistent or holds out-of-vocabulary ids."""


@dataclass
class IndexedDatasetInfo:
    prefix: str
    dtype: type
    num_sequences: int
    num_documents: int
    num_tokens: int


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def loss_mask_prefix(prefix: str) -> str:
    """Where the loss mask of the dataset ``prefix`` lives (a dataset of its own, uint8)."""
    return prefix + "_loss_mask"


def validate_indexed_dataset(prefix: str) -> IndexedDatasetInfo:
    """Header, index size and ``.bin`` size agree; raises ``DatasetFileError`` naming the fix."""
    info, _, _ = _read_index(prefix)
    return info


def _read_index(prefix: str):
    """``(info, sequence lengths, document index)`` after every check of ``validate_indexed_dataset``."""
    ipath, bpath = idx_path(prefix), bin_path(prefix)
    for path in (ipath, bpath):
        if not os.path.isfile(path):
            raise DatasetFileError(
                f"dataset prefix {prefix!r}: {path} does not exist (make the dataset with "
                "tools/preprocess_data.py; --data-path takes the prefix without .bin/.idx)"
            )
    idx_size = os.path.getsize(ipath)
    with open(ipath, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != INDEX_HEADER:
        raise DatasetFileError(f"{ipath} is not a Megatron index file (bad header); remake it with tools/preprocess_data.py")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in _DTYPES:
        raise DatasetFileError(f"{ipath}: unsupported index version {version} or dtype code {code}")
    dtype = _DTYPES[code]
    need = _HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if idx_size < need:
        raise DatasetFileError(
            f"{ipath} is truncated: {idx_size} bytes, its header needs {need}; remake the dataset"
        )
    mm = np.memmap(ipath, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, np.int32, n_seq, _HEADER_BYTES)
    pointers = np.frombuffer(mm, np.int64, n_seq, _HEADER_BYTES + 4 * n_seq)
    docs = np.frombuffer(mm, np.int64, n_doc, _HEADER_BYTES + 12 * n_seq)
    itemsize = np.dtype(dtype).itemsize
    _check_index_arrays(ipath, lengths, pointers, docs, itemsize)
    expected = int(pointers[-1]) + int(lengths[-1]) * itemsize if n_seq else 0
    actual = os.path.getsize(bpath)
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its index says"
        raise DatasetFileError(
            f"{bpath} is {what}: {actual} bytes, {ipath} describes {expected}; the files do not belong "
            "together or a copy/preprocessing run was interrupted: remake or re-copy both"
        )
    num_tokens = int(lengths.sum(dtype=np.int64))
    info = IndexedDatasetInfo(prefix, dtype, int(n_seq), int(n_doc) - 1, num_tokens)
    # Views of the memory-mapped index (no copy: an index may describe billions of tokens).
    return info, lengths, docs


def validate_loss_mask(prefix: str, cache_dir: Optional[str] = None) -> IndexedDatasetInfo:
    """The loss mask of ``prefix`` exists, is whole, holds only 0 and 1, and has exactly the
    documents and sequences of the tokens (so that every token has its mark). The scan for the
    largest mark is cached under ``cache_dir`` as ``check_token_ids``'s."""
    info, lengths, docs = _read_index(prefix)
    marks_prefix = loss_mask_prefix(prefix)
    if not (os.path.isfile(idx_path(marks_prefix)) or os.path.isfile(bin_path(marks_prefix))):
        raise DatasetFileError(
            f"--loss-on-spans: dataset {prefix!r} has no loss mask ({marks_prefix}.bin/.idx): make it with "
            "tools/preprocess_data.py --loss-spans-key KEY (a field of [start, end) character spans of the "
            "text to train on), or train on every token without --loss-on-spans")
    fix = "remake the dataset and its mask together with tools/preprocess_data.py --loss-spans-key"
    marks, mark_lengths, mark_docs = _read_index(marks_prefix)
    if marks.dtype != np.uint8:
        raise DatasetFileError(f"{idx_path(marks_prefix)} holds {np.dtype(marks.dtype).name}, not the uint8 "
                               f"marks of a loss mask; {fix}")
    if not (np.array_equal(lengths, mark_lengths) and np.array_equal(docs, mark_docs)):
        raise DatasetFileError(
            f"the loss mask {marks_prefix!r} ({marks.num_documents} documents, {marks.num_tokens} marks) does not "
            f"describe the documents of {prefix!r} ({info.num_documents} documents, {info.num_tokens} tokens): "
            f"the files come from different runs; {fix}")
    top, where = _cached_max_token_id(marks_prefix, marks, cache_dir)
    if top == 0:
        raise DatasetFileError(f"the loss mask {marks_prefix!r} marks no token of {prefix!r}: every span list was "
                               "empty, so --loss-on-spans would train on nothing; check --loss-spans-key and the spans")
    if top > 1:
        raise DatasetFileError(f"{bin_path(marks_prefix)} holds {top} at position {where}; a loss mask holds "
                               f"only 0 and 1; {fix}")
    return marks


def _check_index_arrays(ipath: str, lengths, pointers, docs, itemsize: int) -> None:
    """The index's three arrays describe one contiguous ``.bin`` and nest documents over sequences.

    megatron-core trusts these arrays as they are: a flipped byte in a length becomes a negative
    or huge sample silently cut from the wrong place, so they are checked whole (vectorised, a
    few ms per million sequences) before anything is read through them.
    """
    fix = "the file is damaged (bit flip, partial copy, or written by another tool): remake it with tools/preprocess_data.py"
    if len(lengths):
        bad = np.flatnonzero(lengths <= 0)
        if len(bad):
            i = int(bad[0])
            raise DatasetFileError(f"{ipath}: sequence {i} has length {int(lengths[i])} "
                                   f"({len(bad)} sequences are not positive); {fix}")
        if pointers[0] != 0:
            raise DatasetFileError(f"{ipath}: the first sequence starts at byte {int(pointers[0])}, not 0; {fix}")
        step = np.diff(pointers) != lengths[:-1].astype(np.int64) * itemsize
        if step.any():
            i = int(np.flatnonzero(step)[0])
            raise DatasetFileError(
                f"{ipath}: sequence {i + 1} starts at byte {int(pointers[i + 1])}, but sequence {i} "
                f"({int(lengths[i])} tokens from byte {int(pointers[i])}) ends at "
                f"{int(pointers[i]) + int(lengths[i]) * itemsize}; {fix}")
    if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(lengths):
        raise DatasetFileError(f"{ipath}: the document index must run from sequence 0 to the sequence "
                               f"count {len(lengths)}; {fix}")
    back = np.flatnonzero(np.diff(docs) < 0)
    if len(back):
        i = int(back[0])
        raise DatasetFileError(f"{ipath}: document {i + 1} starts at sequence {int(docs[i + 1])}, before "
                               f"document {i} (sequence {int(docs[i])}); {fix}")


def _max_token_id(prefix: str, info: IndexedDatasetInfo, chunk: int = 1 << 24) -> tuple:
    data = np.memmap(bin_path(prefix), mode="r", dtype=info.dtype)
    best, where = -1, -1
    for start in range(0, len(data), chunk):
        part = np.asarray(data[start:start + chunk])
        m = int(part.max())
        if m > best:
            best, where = m, start + int(part.argmax())
    del data
    return best, where


def _cached_max_token_id(prefix: str, info: IndexedDatasetInfo, cache_dir: Optional[str]) -> tuple:
    """``_max_token_id``, cached under ``cache_dir`` (keyed by path, size and modification time) so
    that restarts do not rescan terabytes."""
    stat = os.stat(bin_path(prefix))
    key = hashlib.md5(
        f"{os.path.abspath(bin_path(prefix))}|{stat.st_size}|{stat.st_mtime_ns}".encode(), usedforsecurity=False
    ).hexdigest()
    cache_file = os.path.join(cache_dir, f"max_token_id-{key}.json") if cache_dir else None
    if cache_file and os.path.isfile(cache_file):
        with open(cache_file) as f:
            return tuple(json.load(f))
    found = _max_token_id(prefix, info)
    if cache_file:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(list(found), f)
        os.replace(tmp, cache_file)
    return found


def check_token_ids(prefixes: Iterable[str], vocab_size: int, cache_dir: Optional[str] = None) -> None:
    """Raise ``DatasetFileError`` unless every token id in every dataset is below ``vocab_size``.

    The maximum id of each ``.bin`` is cached under ``cache_dir`` (keyed by path, size and
    modification time) so that restarts do not rescan terabytes.
    """
    for prefix in prefixes:
        info = validate_indexed_dataset(prefix)
        if np.iinfo(info.dtype).max < vocab_size:
            continue  # the dtype cannot hold an id that large
        max_id, where = _cached_max_token_id(prefix, info, cache_dir)
        if max_id >= vocab_size:
            raise DatasetFileError(
                f"dataset {prefix!r} holds token id {max_id} (first at token {where}), but the model's "
                f"vocabulary has {vocab_size} rows: it was tokenized with a larger tokenizer; remake it "
                f"with the model's tokenizer or train a model with --vocab-size > {max_id}"
            )
