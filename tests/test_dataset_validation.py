"""An indexed dataset whose .idx contradicts itself is refused when it is opened, naming the file.

Before these checks, four changed bytes in a .idx (two sequence lengths became -65482 and 65535)
trained to the end with exit 0: megatron-core reads the arrays as they are.
"""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_rwkvx.data.indexed import DatasetFileError, validate_indexed_dataset

HEADER = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8


@pytest.fixture()
def dataset(tmp_path):
    """Six documents, the third made of two sequences (so documents and sequences differ)."""
    prefix = str(tmp_path / "docs")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    for i in range(6):
        parts = [rng.integers(1, 100, 7 + i), rng.integers(1, 100, 3)] if i == 2 else [rng.integers(1, 100, 5 + i)]
        builder.add_document(np.concatenate(parts), [len(p) for p in parts])
    builder.finalize(prefix + ".idx")
    return prefix


def _poke(prefix: str, offset: int, fmt: str, value) -> None:
    raw = bytearray(Path(prefix + ".idx").read_bytes())
    raw[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    Path(prefix + ".idx").write_bytes(bytes(raw))


N_SEQ = 7
LENGTHS, POINTERS, DOCS = HEADER, HEADER + 4 * N_SEQ, HEADER + 12 * N_SEQ

CASES = {
    # name: (offset, struct format, value, phrases of the error)
    "negative length": (LENGTHS + 4, "<i", -65482, ["sequence 1 has length -65482"]),
    "zero length": (LENGTHS, "<i", 0, ["sequence 0 has length 0"]),
    "length longer than the bytes before the next pointer": (
        LENGTHS + 4, "<i", 65535, ["sequence 2 starts at byte", "sequence 1 (65535 tokens"]),
    "pointer out of step": (POINTERS + 8 * 3, "<q", 999, ["sequence 3 starts at byte 999"]),
    "first pointer not zero": (POINTERS, "<q", 2, ["first sequence starts at byte 2"]),
    "document index going back": (DOCS + 8 * 3, "<q", 1, ["document 3 starts at sequence 1", "before document 2"]),
    "document index past the end": (DOCS + 8 * 6, "<q", 9, ["from sequence 0 to the sequence count 7"]),
}


def test_the_fixture_is_consistent(dataset):
    info = validate_indexed_dataset(dataset)
    assert (info.num_sequences, info.num_documents) == (N_SEQ, 6)


@pytest.mark.parametrize("case", list(CASES))
def test_an_inconsistent_index_is_named(dataset, case):
    offset, fmt, value, phrases = CASES[case]
    _poke(dataset, offset, fmt, value)
    with pytest.raises(DatasetFileError) as err:
        validate_indexed_dataset(dataset)
    message = str(err.value)
    assert message.startswith(dataset + ".idx: "), message
    assert "remake it with tools/preprocess_data.py" in message
    for phrase in phrases:
        assert phrase in message, (phrase, message)


def test_a_zero_sequence_document_is_valid(tmp_path, dataset):
    """Megatron-LM keeps an empty document as a document of no sequences: not an error."""
    prefix = str(tmp_path / "with_empty")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_document(np.arange(1, 6), [5])
    builder.add_document(np.array([], dtype=np.int64), [])
    builder.add_document(np.arange(1, 4), [3])
    builder.finalize(prefix + ".idx")
    info = validate_indexed_dataset(prefix)
    assert (info.num_sequences, info.num_documents, info.num_tokens) == (2, 3, 8)


def test_a_bin_from_another_dataset_is_named(tmp_path, dataset):
    shutil.copy(dataset + ".bin", str(tmp_path / "other.bin"))
    with open(str(tmp_path / "other.bin"), "ab") as f:
        f.write(b"\0\0")
    shutil.copy(dataset + ".idx", str(tmp_path / "other.idx"))
    with pytest.raises(DatasetFileError, match="longer than its index says"):
        validate_indexed_dataset(str(tmp_path / "other"))
