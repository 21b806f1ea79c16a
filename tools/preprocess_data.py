#!/usr/bin/env python
"""Tokenize text into Megatron indexed datasets ({prefix}_{key}_document.bin/.idx), and with
--loss-spans-key a loss mask beside each ({prefix}_{key}_document_loss_mask.bin/.idx).

Arguments follow Megatron-LM's tools/preprocess_data.py. Examples:

  python tools/preprocess_data.py --input corpus/ --output-prefix data/minipile --append-eod --workers 32
  python tools/preprocess_data.py --input prolong.jsonl.gz --output-prefix data/prolong64k --pack-length 65536

The output is read by megatron-core's IndexedDataset; pass --data-path data/minipile_text_document
to training. Documents keep the input order whatever --workers/--partitions are.
"""
from __future__ import annotations

import argparse
import sys

# First import of ours: megatron_rwkvx silences megatron-core's import-time notices (console.py).
from megatron_rwkvx.data.tokenizers import TOKENIZER_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True,
                   help="a .jsonl/.json (one object per line), .jsonl.gz or .parquet file, a directory of them "
                        "(read recursively in name order), a directory saved with datasets' save_to_disk, or a "
                        "Hugging Face dataset name (needs it in the local cache when offline)")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys (jsonl) or columns (parquet, datasets) to tokenize; one output dataset per key")
    g.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset")
    g.add_argument("--loss-spans-key", default=None, metavar="KEY",
                   help="the field of each record holding the [start, end) character spans of its text to train "
                        "on (e.g. {\"text\": \"Q: 2+2? A: 4\", \"answers\": [[11, 12]]}); writes a loss mask beside "
                        "the dataset ({prefix}_text_document_loss_mask.bin/.idx) that pretrain --loss-on-spans "
                        "reads. The text is tokenized piece by piece at the spans' edges; with --append-eod the "
                        "end of document is trained where the last span ends the text")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed JSON, missing keys, non-string values and non-UTF-8 lines, count and "
                        "report them; without it the first such line stops the run with its file and line number")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="RWKVWorldTokenizer", choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model, Hugging Face tokenizer.json (or its directory), or for RWKV World "
                        "an alternative vocabulary file (default: the one in the rwkv package)")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2's vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2's merges.txt")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer: ids in the text are below it")
    g.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document id")
    g.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (nltk punkt, tokenized alone), as Megatron-LM")
    g.add_argument("--lang", default="english", help="--split-sentences: punkt's language")
    g.add_argument("--keep-newlines", action="store_true", help="--split-sentences: keep newlines between sentences")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output (refused otherwise)")
    g.add_argument("--pack-length", type=int, default=None,
                   help="join documents with the end-of-document id (implies --append-eod) and cut the stream into "
                        "documents of exactly this many tokens; the last partial one is dropped")
    g.add_argument("--min-length", type=int, default=None, help="drop documents with fewer tokens (before EOD)")
    g.add_argument("--max-length", type=int, default=None, help="drop documents with more tokens (before EOD)")
    g.add_argument("--drop-empty-documents", action="store_true",
                   help="leave out documents with no tokens (default: kept as documents of no sequences, "
                        "as Megatron-LM does, so the .idx is the same)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (in total, over all partitions)")
    g.add_argument("--partitions", type=int, default=1,
                   help="process contiguous groups of input files in parallel, then merge them in order")
    g.add_argument("--log-interval", type=int, default=10000, help="progress line every this many documents")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="accepted for Megatron-LM scripts: documents always keep the input order here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rwkvx.data.indexed import DatasetFileError
    from megatron_rwkvx.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess
    from megatron_rwkvx.data.readers import InputError
    from megatron_rwkvx.data.tokenizers import TokenizerError

    cfg = PreprocessConfig(
        input=args.input, output_prefix=args.output_prefix, json_keys=tuple(args.json_keys),
        tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model, append_eod=args.append_eod,
        workers=args.workers, partitions=args.partitions, log_interval=args.log_interval,
        skip_bad_lines=args.skip_bad_lines, overwrite=args.overwrite, hf_split=args.hf_split,
        pack_length=args.pack_length, min_length=args.min_length, max_length=args.max_length,
        drop_empty_documents=args.drop_empty_documents, split_sentences=args.split_sentences, lang=args.lang,
        keep_newlines=args.keep_newlines, vocab_file=args.vocab_file, merge_file=args.merge_file,
        vocab_size=args.vocab_size, loss_spans_key=args.loss_spans_key,
    )
    try:
        run_preprocess(cfg)
    except (PreprocessError, InputError, TokenizerError, DatasetFileError) as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
