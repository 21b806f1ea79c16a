"""Documents from jsonl / jsonl.gz / parquet files, directories of them, or Hugging Face datasets.

Readers yield raw records (a jsonl line as bytes, a parquet or Hugging Face row as a dict) with
their file and line number; ``parse_record`` turns one into ``{key: text}`` (and
``parse_loss_spans`` reads the spans that ``--loss-spans-key`` names) or raises
``BadRecord`` naming the file, the line and the problem. Parsing is separate from reading so
that it runs in the tokenizer worker processes.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES


class InputError(ValueError):
    """The input cannot be read at all (missing path, unsupported format)."""


class BadRecord(ValueError):
    """One document cannot be used: malformed JSON, a missing key, a non-string value, bad bytes."""


@dataclass
class Record:
    source: str
    line: int  # 1-based line (jsonl) or row (parquet, Hugging Face)
    payload: Union[bytes, dict]
    end_offset: int  # input bytes consumed after this record (for progress)


def _is_supported(path: str) -> bool:
    return path.endswith(SUPPORTED_SUFFIXES)


def is_saved_hf_dataset(path: str) -> bool:
    """A directory written by ``datasets.Dataset.save_to_disk`` (or a DatasetDict)."""
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))
    )


def list_input_files(input_path: str) -> Optional[List[str]]:
    """The files to read in order, or None when ``input_path`` is a Hugging Face dataset."""
    if os.path.isfile(input_path):
        if not _is_supported(input_path):
            raise InputError(
                f"{input_path!r}: unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}"
            )
        return [input_path]
    if os.path.isdir(input_path):
        if is_saved_hf_dataset(input_path):
            return None
        files = []
        for root, dirs, names in os.walk(input_path):
            dirs.sort()
            files.extend(os.path.join(root, n) for n in sorted(names) if _is_supported(n))
        if not files:
            raise InputError(
                f"directory {input_path!r} holds no {', '.join(SUPPORTED_SUFFIXES)} files"
            )
        return files
    if os.path.sep in input_path or input_path.startswith("."):
        raise InputError(f"input {input_path!r} does not exist")
    return None  # a Hugging Face hub name (only works if the dataset is in the local cache offline)


def input_size(files: Sequence[str]) -> int:
    return sum(os.path.getsize(f) for f in files)


def iter_file_records(path: str, json_keys: Sequence[str], base_offset: int = 0) -> Iterator[Record]:
    if path.endswith(PARQUET_SUFFIXES):
        yield from _iter_parquet(path, json_keys, base_offset)
        return
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
        lineno = 0
        try:
            for lineno, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                yield Record(path, lineno, line, base_offset + raw.tell())
        except (OSError, EOFError) as e:  # corrupt or truncated gzip
            raise InputError(f"{path}: cannot be read past line {lineno} ({e})") from e


def _iter_parquet(path: str, json_keys: Sequence[str], base_offset: int) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise InputError(f"{path}: not a readable parquet file ({e})") from e
    missing = [k for k in json_keys if k not in pf.schema_arrow.names]
    if missing:
        raise InputError(
            f"{path}: parquet columns {pf.schema_arrow.names} lack {missing}; pick columns with --json-keys (and --loss-spans-key)"
        )
    size = os.path.getsize(path)
    row = 0
    total = max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(columns=list(json_keys), batch_size=1024):
        columns = {k: batch.column(k).to_pylist() for k in json_keys}
        for i in range(batch.num_rows):
            row += 1
            yield Record(path, row, {k: columns[k][i] for k in json_keys}, base_offset + size * row // total)


def iter_hf_records(name: str, split: str, json_keys: Sequence[str]) -> Iterator[Record]:
    import datasets

    try:
        if is_saved_hf_dataset(name):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise InputError(f"{name!r} has splits {list(ds)}, not {split!r}; pick one with --hf-split")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except InputError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ...)
        raise InputError(
            f"cannot load Hugging Face dataset {name!r} split {split!r} ({type(e).__name__}: {e}); offline, "
            "give a local file/directory or a dataset already in the cache (HF_DATASETS_OFFLINE=1)"
        ) from e
    missing = [k for k in json_keys if k not in ds.column_names]
    if missing:
        raise InputError(f"dataset {name!r} has columns {ds.column_names}, not {missing}; pick them with --json-keys (and --loss-spans-key)")
    for row, item in enumerate(ds.select_columns(list(json_keys)), 1):
        yield Record(name, row, item, row)


def record_object(record: Record) -> dict:
    """The record as a dict (a jsonl line decoded and parsed), or ``BadRecord``."""
    where = f"{record.source}:{record.line}"
    payload = record.payload
    if isinstance(payload, bytes):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord(
                f"{where}: not valid UTF-8 (byte 0x{payload[e.start]:02x} at byte {e.start} of the line)"
            ) from None
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRecord(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(payload, dict):
            raise BadRecord(f"{where}: expected a JSON object, got {type(payload).__name__}")
    return payload


def parse_record(record: Record, json_keys: Sequence[str], obj: Optional[dict] = None) -> Dict[str, str]:
    """``{key: text}`` of ``record`` (``obj``: its ``record_object`` if already parsed)."""
    where = f"{record.source}:{record.line}"
    payload = record_object(record) if obj is None else obj
    out = {}
    for key in json_keys:
        if key not in payload:
            raise BadRecord(f"{where}: no key {key!r} (keys: {sorted(payload)[:10]}); choose with --json-keys")
        value = payload[key]
        if not isinstance(value, str):
            raise BadRecord(f"{where}: {key!r} is {type(value).__name__}, not a string")
        out[key] = value
    return out


def parse_loss_spans(record: Record, obj: dict, spans_key: str, text: str) -> List[Tuple[int, int]]:
    """The ``[start, end)`` character spans of ``text`` that the loss is on, sorted, overlaps merged.

    ``obj[spans_key]`` is a list of two-integer lists (Python string indices, as ``text[start:end]``);
    an empty list marks no token of the document.
    """
    where = f"{record.source}:{record.line}"
    if spans_key not in obj:
        raise BadRecord(f"{where}: no key {spans_key!r} (keys: {sorted(obj)[:10]}); --loss-spans-key names the "
                        "field of [start, end) spans to train on ([] for none)")
    value = obj[spans_key]
    if isinstance(value, str):  # a parquet or datasets column may hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, list):
        raise BadRecord(f"{where}: {spans_key!r} is {type(value).__name__}, not a list of [start, end] spans")
    spans = []
    for item in value:
        ok = (isinstance(item, (list, tuple)) and len(item) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in item))
        if not ok or not 0 <= item[0] < item[1] <= len(text):
            raise BadRecord(f"{where}: {spans_key!r} holds {item!r}: each span must be [start, end) with "
                            f"0 <= start < end <= {len(text)} (the text's length in characters)")
        spans.append((int(item[0]), int(item[1])))
    merged: List[Tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged
