"""Text -> Megatron indexed datasets (the engine behind ``tools/preprocess_data.py``).

Order and bytes do not depend on ``workers`` or ``partitions``: records are tokenized in
batches by ``Pool.imap`` (which keeps input order), partitions are contiguous groups of input
files merged back in order, and packing cuts the merged token stream. Everything is written
under a temporary directory beside the output and moved into place only when the run succeeded.

With ``loss_spans_key`` each document also gets a loss mask (``indexed.loss_mask_prefix``): one
byte per token, 1 where the token lies in one of the document's ``[start, end)`` character spans
(the tokens a model is trained to predict, as the answers of an SFT or retrieval corpus). The text
is tokenized piece by piece at the spans' edges, so no token straddles an edge (SFT pipelines
tokenize a prompt and its answer apart for the same reason; for the byte tokenizer the ids are
those of the whole text). The mask goes through every later step (merging, packing) with the
tokens.
"""
from __future__ import annotations

import bisect
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from megatron_rwkvx.data import readers
from megatron_rwkvx.data.indexed import bin_path, idx_path, loss_mask_prefix

BATCH_RECORDS = 256
BATCH_BYTES = 4 << 20
MAX_REPORTED_BAD = 10


class PreprocessError(RuntimeError):
    """The run stopped (bad input without --skip-bad-lines, existing output, ...)."""


@dataclass
class PreprocessConfig:
    input: str
    output_prefix: str
    json_keys: Sequence[str] = ("text",)
    tokenizer_type: str = "RWKVWorldTokenizer"
    tokenizer_model: Optional[str] = None
    append_eod: bool = False
    workers: int = 1
    partitions: int = 1
    log_interval: int = 10000
    skip_bad_lines: bool = False
    overwrite: bool = False
    hf_split: str = "train"
    pack_length: Optional[int] = None
    min_length: Optional[int] = None
    max_length: Optional[int] = None
    # Megatron-LM keeps an empty document as a document of no sequences (its .idx counts it).
    drop_empty_documents: bool = False
    split_sentences: bool = False  # one sequence per sentence (nltk punkt), as Megatron-LM
    lang: str = "english"
    keep_newlines: bool = False
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    vocab_size: Optional[int] = None
    # The record field of [start, end) character spans of the text to train on: writes a loss mask
    # beside the dataset (one json key only; pretrain --loss-on-spans reads it).
    loss_spans_key: Optional[str] = None

    def output_prefix_for(self, key: str) -> str:
        return f"{self.output_prefix}_{key}_document"

    def record_keys(self) -> List[str]:
        """The fields the readers keep of each record (parquet and datasets read only these)."""
        return list(self.json_keys) + ([self.loss_spans_key] if self.loss_spans_key else [])


@dataclass
class Stats:
    records: int = 0
    bad: int = 0
    bad_examples: List[str] = field(default_factory=list)
    documents: Dict[str, int] = field(default_factory=dict)
    tokens: Dict[str, int] = field(default_factory=dict)
    empty: Dict[str, int] = field(default_factory=dict)
    too_short: Dict[str, int] = field(default_factory=dict)
    too_long: Dict[str, int] = field(default_factory=dict)
    packed_sequences: Dict[str, int] = field(default_factory=dict)
    dropped_remainder: Dict[str, int] = field(default_factory=dict)
    marked: Dict[str, int] = field(default_factory=dict)  # tokens in a loss span (kept documents)

    def merge(self, other: "Stats") -> None:
        self.records += other.records
        self.bad += other.bad
        self.bad_examples.extend(other.bad_examples[: MAX_REPORTED_BAD - len(self.bad_examples)])
        for name in ("documents", "tokens", "empty", "too_short", "too_long", "marked"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v


# -- worker side --------------------------------------------------------------------------------
_worker: dict = {}


def build_config_tokenizer(cfg: PreprocessConfig):
    from megatron_rwkvx.data.tokenizers import build_tokenizer

    return build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model, vocab_file=cfg.vocab_file,
                           merge_file=cfg.merge_file, vocab_size=cfg.vocab_size)


def load_sentence_splitter(lang: str, keep_newlines: bool):
    """nltk's punkt model for ``lang``, as Megatron-LM's --split-sentences loads it."""
    try:
        import nltk
    except ImportError as e:
        raise PreprocessError("--split-sentences needs nltk: pip install nltk") from e
    try:
        splitter = nltk.load(f"tokenizers/punkt/{lang}.pickle")
    except LookupError as e:
        raise PreprocessError(
            f"--split-sentences needs nltk's punkt model for {lang!r}, which is not installed: "
            "python -c \"import nltk; nltk.download('punkt')\" (or set NLTK_DATA)") from e
    if keep_newlines:
        from nltk.tokenize.punkt import PunktLanguageVars, PunktSentenceTokenizer

        class _KeepNewlines(PunktLanguageVars):
            # Megatron-LM's variant: a newline after the period stays with the sentence.
            _period_context_fmt = r"""
                \S*                          # some word material
                %(SentEndChars)s             # a potential sentence ending
                \s*                       #  <-- THIS is what I changed
                (?=(?P<after_tok>
                    %(NonWord)s              # either other punctuation
                    |
                    (?P<next_tok>\S+)     #  <-- Normally you would have \s+ here
                ))"""

        splitter = PunktSentenceTokenizer(train_text=splitter._params, lang_vars=_KeepNewlines())
    return splitter.tokenize


def _init_worker(cfg: PreprocessConfig, dtype) -> None:
    _worker["cfg"] = cfg
    _worker["dtype"] = dtype
    _worker["tokenizer"] = build_config_tokenizer(cfg)
    _worker["split"] = load_sentence_splitter(cfg.lang, cfg.keep_newlines) if cfg.split_sentences else None


def _tokenize_spans(tok, text: str, spans) -> tuple:
    """``(ids, marks)`` of ``text`` tokenized piece by piece at the edges of ``spans``."""
    edges = sorted({0, len(text), *(e for span in spans for e in span)})
    starts = [a for a, _ in spans]
    ids, marks = [], []
    for start, end in zip(edges[:-1], edges[1:]):
        piece = tok.tokenize_array(text[start:end])
        k = bisect.bisect_right(starts, start) - 1  # the last span starting at or before the piece
        mark = k >= 0 and spans[k][1] >= end
        ids.append(piece)
        marks.append(np.full(piece.size, mark, np.uint8))
    if not ids:
        return np.zeros(0, np.int32), np.zeros(0, np.uint8)
    return np.concatenate(ids), np.concatenate(marks)


def _tokenize_batch(records: List[readers.Record]) -> tuple:
    """``(input offset after the batch, text bytes, results)``; a result per record is
    ``(None, {key: (ids, sequence lengths, marks or None)})`` or ``(message, None)`` for a bad
    record."""
    cfg, tok, dtype, split = _worker["cfg"], _worker["tokenizer"], _worker["dtype"], _worker["split"]
    append_eod = cfg.append_eod or cfg.pack_length is not None
    out = []
    text_bytes = 0
    for record in records:
        try:
            obj = readers.record_object(record)
            texts = readers.parse_record(record, cfg.json_keys, obj)
            spans = (readers.parse_loss_spans(record, obj, cfg.loss_spans_key, next(iter(texts.values())))
                     if cfg.loss_spans_key else None)
        except readers.BadRecord as e:
            out.append((str(e), None))
            continue
        docs = {}
        for key, text in texts.items():
            text_bytes += len(text)
            marks = None
            try:
                if spans is not None:
                    ids, marks = _tokenize_spans(tok, text, spans)
                    parts = [ids] if ids.size else []
                else:
                    # Megatron-LM tokenizes each sentence alone and drops empty ones.
                    parts = [tok.tokenize_array(t) for t in (split(text) if split else [text]) if t]
            except ValueError as e:
                out.append((f"{record.source}:{record.line}: {key!r}: {e}", None))
                break
            parts = [p for p in parts if p.size]
            lengths = [int(p.size) for p in parts]
            ids = np.concatenate(parts) if parts else np.zeros(0, np.int32)
            if append_eod and ids.size:
                ids = np.append(ids, tok.eod)
                lengths[-1] += 1
                if marks is not None:
                    # The end of document is trained where an answer runs to the end of the text
                    # (an SFT answer, so that the model learns to stop), not after a prompt.
                    marks = np.append(marks, np.uint8(bool(spans) and spans[-1][1] == len(text)))
            docs[key] = (ids.astype(dtype, copy=False), lengths, marks)
        else:
            out.append((None, docs))
    return records[-1].end_offset, text_bytes, out


# -- main side ----------------------------------------------------------------------------------
def _batches(records, cfg: PreprocessConfig):
    batch, size = [], 0
    for r in records:
        batch.append(r)
        size += len(r.payload) if isinstance(r.payload, bytes) else 64
        if len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _records(files: Optional[List[str]], cfg: PreprocessConfig):
    if files is None:
        yield from readers.iter_hf_records(cfg.input, cfg.hf_split, cfg.record_keys())
        return
    offset = 0
    for path in files:
        yield from readers.iter_file_records(path, cfg.record_keys(), offset)
        offset += os.path.getsize(path)


class _Progress:
    def __init__(self, total_bytes: Optional[int], log: Callable[[str], None], tag: str):
        self.start = time.time()
        self.total, self.log, self.tag = total_bytes, log, tag

    def report(self, stats: Stats, text_bytes: int, done_bytes: int, final: bool = False) -> None:
        """``text_bytes``: characters tokenized (MB/s); ``done_bytes``: input file offset (ETA)."""
        dt = max(time.time() - self.start, 1e-9)
        docs = stats.records
        toks = sum(stats.tokens.values())
        mb = (done_bytes if self.total else text_bytes) / dt / 1e6
        line = f"{self.tag}{docs} docs, {docs / dt:,.0f} docs/s, {toks / dt:,.0f} tokens/s, {mb:.1f} MB/s"
        if self.total and not final:
            rate = done_bytes / dt
            eta = (self.total - done_bytes) / rate if rate > 0 else float("inf")
            line += f", {100 * done_bytes / self.total:.1f}% of input, ETA {eta:,.0f} s"
        if final:
            line += f", {dt:.1f} s"
        self.log(line)


def _tokenize_to(files: Optional[List[str]], cfg: PreprocessConfig, out_prefix: str, workers: int,
                 dtype, log: Callable[[str], None], tag: str = "") -> Stats:
    """Tokenize ``files`` into ``{out_prefix}_{key}_document`` datasets; returns the counts."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    stats = Stats()
    builders, mark_builders = {}, {}
    for key in cfg.json_keys:
        builders[key] = IndexedDatasetBuilder(bin_path(f"{out_prefix}_{key}_document"), dtype=dtype)
        if cfg.loss_spans_key:
            mark_builders[key] = IndexedDatasetBuilder(
                bin_path(loss_mask_prefix(f"{out_prefix}_{key}_document")), dtype=np.uint8)
        for name in ("documents", "tokens", "empty", "too_short", "too_long", "marked"):
            getattr(stats, name)[key] = 0
    progress = _Progress(readers.input_size(files) if files else None, log, tag)
    next_log = cfg.log_interval
    batches = _batches(_records(files, cfg), cfg)
    pool = None
    if workers > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(cfg, dtype))
        results = pool.imap(_tokenize_batch, batches, chunksize=1)
    else:
        _init_worker(cfg, dtype)
        results = map(_tokenize_batch, batches)
    done_bytes = text_bytes = 0
    try:
        for done_bytes, batch_text, batch_result in results:
            text_bytes += batch_text
            for message, docs in batch_result:
                stats.records += 1
                if message is not None:
                    stats.bad += 1
                    if not cfg.skip_bad_lines:
                        raise PreprocessError(f"{message} (pass --skip-bad-lines to skip such lines and count them)")
                    if len(stats.bad_examples) < MAX_REPORTED_BAD:
                        stats.bad_examples.append(message)
                    continue
                for key, (ids, lengths, marks) in docs.items():
                    n = int(ids.size) - (1 if (cfg.append_eod or cfg.pack_length) and ids.size else 0)
                    if n == 0:
                        stats.empty[key] += 1
                        if not cfg.drop_empty_documents and not cfg.pack_length:
                            builders[key].add_document(ids, [])  # a document of no sequences
                            if marks is not None:
                                mark_builders[key].add_document(marks, [])
                            stats.documents[key] += 1
                    elif cfg.min_length is not None and n < cfg.min_length:
                        stats.too_short[key] += 1
                    elif cfg.max_length is not None and n > cfg.max_length:
                        stats.too_long[key] += 1
                    else:
                        builders[key].add_document(ids, lengths)
                        if marks is not None:
                            mark_builders[key].add_document(marks, lengths)
                            stats.marked[key] += int(marks.sum())
                        stats.documents[key] += 1
                        stats.tokens[key] += int(ids.size)
            if cfg.log_interval and stats.records >= next_log:
                progress.report(stats, text_bytes, done_bytes)
                next_log = (stats.records // cfg.log_interval + 1) * cfg.log_interval
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    for key, builder in builders.items():
        builder.finalize(idx_path(f"{out_prefix}_{key}_document"))
    for key, builder in mark_builders.items():
        builder.finalize(idx_path(loss_mask_prefix(f"{out_prefix}_{key}_document")))
    progress.report(stats, text_bytes, done_bytes, final=True)
    return stats


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_config(cfg: PreprocessConfig) -> None:
    if not cfg.json_keys:
        raise PreprocessError("--json-keys needs at least one key")
    if cfg.workers < 1 or cfg.partitions < 1:
        raise PreprocessError("--workers and --partitions must be at least 1")
    if cfg.pack_length is not None and cfg.pack_length < 2:
        raise PreprocessError(f"--pack-length must be at least 2 tokens, got {cfg.pack_length}")
    if cfg.min_length is not None and cfg.min_length < 0:
        raise PreprocessError("--min-length must be >= 0")
    if cfg.min_length is not None and cfg.max_length is not None and cfg.max_length < cfg.min_length:
        raise PreprocessError(f"--max-length {cfg.max_length} is below --min-length {cfg.min_length}")
    if cfg.loss_spans_key is not None:
        if len(cfg.json_keys) != 1:
            raise PreprocessError(f"--loss-spans-key marks spans of one text, but --json-keys gives "
                                  f"{list(cfg.json_keys)}: give one key")
        if cfg.loss_spans_key in cfg.json_keys:
            raise PreprocessError(f"--loss-spans-key {cfg.loss_spans_key!r} is also the text key: name the field "
                                  "that holds the [start, end) spans")
        if cfg.split_sentences:
            raise PreprocessError("--loss-spans-key and --split-sentences cannot be combined: the spans are "
                                  "character offsets of the whole text, which the sentence splitter cuts")


def output_prefixes(cfg: PreprocessConfig) -> List[str]:
    """Every dataset the run writes: one per json key, and its loss mask with --loss-spans-key."""
    out = []
    for key in cfg.json_keys:
        out.append(cfg.output_prefix_for(key))
        if cfg.loss_spans_key:
            out.append(loss_mask_prefix(cfg.output_prefix_for(key)))
    return out


def output_files(cfg: PreprocessConfig) -> List[str]:
    return [p(prefix) for prefix in output_prefixes(cfg) for p in (bin_path, idx_path)]


def _partition(files: Optional[List[str]], n: int, log) -> List[Optional[List[str]]]:
    if files is None:
        if n > 1:
            log("note: a Hugging Face dataset is read as one partition")
        return [None]
    if n > len(files):
        log(f"note: {len(files)} input file(s), so {len(files)} partition(s) instead of {n}")
        n = len(files)
    # Contiguous groups of about equal size in bytes keep the input order when merged back.
    sizes = np.cumsum([os.path.getsize(f) for f in files], dtype=np.float64)
    cuts = np.searchsorted(sizes, sizes[-1] * np.arange(1, n) / n, side="left") + 1
    bounds = [0] + sorted(set(int(min(max(c, 1), len(files) - 1)) for c in cuts)) + [len(files)]
    return [files[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _pack(src_prefix: str, dst_prefix: str, length: int, dtype) -> tuple:
    """Cut the token stream of ``src_prefix`` into ``length``-token documents; drop the rest
    (a loss mask is cut by the same call, with its own dtype)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    data = np.memmap(bin_path(src_prefix), mode="r", dtype=dtype) if os.path.getsize(bin_path(src_prefix)) else np.zeros(0, dtype)
    full = len(data) // length
    builder = IndexedDatasetBuilder(bin_path(dst_prefix), dtype=dtype)
    step = max(1, (1 << 24) // length)
    for start in range(0, full, step):
        stop = min(full, start + step)
        block = np.asarray(data[start * length:stop * length]).reshape(stop - start, length)
        builder.data_file.write(block.tobytes(order="C"))
        builder.sequence_lengths.extend([length] * (stop - start))
        builder.document_indices.extend(range(start + 1, stop + 1))
    builder.finalize(idx_path(dst_prefix))
    dropped = len(data) - full * length
    del data
    return full, dropped


def run_preprocess(cfg: PreprocessConfig, log: Callable[[str], None] = None) -> Stats:
    """Tokenize ``cfg.input`` into ``{output_prefix}_{key}_document.bin/.idx`` per json key."""
    log = log or log_stderr
    _check_config(cfg)
    existing = [f for f in output_files(cfg) if os.path.exists(f)]
    if existing and not cfg.overwrite:
        raise PreprocessError(f"output already exists: {', '.join(existing)}; pass --overwrite to replace it")
    # Built here first: a bad tokenizer fails before any work, and forked workers inherit it.
    tokenizer = build_config_tokenizer(cfg)
    if cfg.split_sentences:
        load_sentence_splitter(cfg.lang, cfg.keep_newlines)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    files = readers.list_input_files(cfg.input)
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{os.path.basename(cfg.output_prefix)}.preprocess-{os.getpid()}")
    os.makedirs(tmp)
    try:
        groups = _partition(files, cfg.partitions, log)
        part_prefixes = [os.path.join(tmp, f"part{k}") for k in range(len(groups))]
        stats = Stats()
        if len(groups) == 1:
            stats.merge(_tokenize_to(groups[0], cfg, part_prefixes[0], cfg.workers, dtype, log))
        else:
            per_part = max(1, cfg.workers // len(groups))
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(len(groups), mp_context=ctx) as ex:
                futures = [
                    ex.submit(_tokenize_to, g, cfg, pp, per_part, dtype, log, f"[partition {k}] ")
                    for k, (g, pp) in enumerate(zip(groups, part_prefixes))
                ]
                for f in futures:
                    stats.merge(f.result())
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        moves = []
        for key in cfg.json_keys:
            name = lambda pp: f"{pp}_{key}_document"  # noqa: E731
            datasets = [(name, cfg.output_prefix_for(key), dtype)]
            if cfg.loss_spans_key:  # the mask is merged and packed as its tokens
                datasets.append((lambda pp: loss_mask_prefix(name(pp)), loss_mask_prefix(cfg.output_prefix_for(key)),
                                 np.uint8))
            for named, final, kind in datasets:
                parts = [named(pp) for pp in part_prefixes]
                merged = named(os.path.join(tmp, "merged"))
                if len(parts) == 1:
                    merged = parts[0]
                else:
                    builder = IndexedDatasetBuilder(bin_path(merged), dtype=kind)
                    for part in parts:
                        builder.add_index(part)
                    builder.finalize(idx_path(merged))
                if cfg.pack_length:
                    packed = named(os.path.join(tmp, "packed"))
                    n, dropped = _pack(merged, packed, cfg.pack_length, kind)
                    if final == cfg.output_prefix_for(key):
                        stats.packed_sequences[key], stats.dropped_remainder[key] = n, dropped
                    merged = packed
                moves.append((merged, final))
        for merged, final in moves:
            # .bin first: an .idx whose .bin is missing is never left in place.
            os.replace(bin_path(merged), bin_path(final))
            os.replace(idx_path(merged), idx_path(final))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log_summary(cfg, stats, log)
    return stats


def _log_summary(cfg: PreprocessConfig, stats: Stats, log) -> None:
    for key in cfg.json_keys:
        line = (f"{cfg.output_prefix_for(key)}: {stats.documents[key]} documents, {stats.tokens[key]} tokens"
                + (f"; skipped {stats.empty[key]} empty" if cfg.drop_empty_documents or cfg.pack_length
                   else f" ({stats.empty[key]} empty, kept as documents of no sequences as Megatron-LM)"))
        if cfg.min_length is not None or cfg.max_length is not None:
            line += f", {stats.too_short[key]} shorter than --min-length, {stats.too_long[key]} longer than --max-length"
        if cfg.pack_length:
            line += (f"; packed into {stats.packed_sequences[key]} sequences of {cfg.pack_length} tokens, "
                     f"dropped the last {stats.dropped_remainder[key]} tokens")
        if cfg.loss_spans_key:
            share = stats.marked[key] / max(stats.tokens[key], 1)
            line += (f"; {stats.marked[key]} tokens ({100 * share:.2f}%) in {cfg.loss_spans_key!r} spans, marked in "
                     f"{loss_mask_prefix(cfg.output_prefix_for(key))} for pretrain --loss-on-spans")
        log(line)
    if stats.bad:
        log(f"skipped {stats.bad} bad line(s) of {stats.records}; first ones:")
        for m in stats.bad_examples:
            log(f"  {m}")
