"""Data for the training loop: the run's tokenizer, the vocabulary check and per-rank iterators
over megatron-core's GPT datasets (built once per process, see ``megatron_rwkvx.data``)."""
from __future__ import annotations

import os
from typing import Dict, Iterator, Optional

from megatron.core import parallel_state

from megatron_rwkvx.data.datasets import (
    DataConfigError,
    DataParallelBatches,
    build_gpt_datasets,
    build_mock_gpt_datasets,
    parse_data_path,
)
from megatron_rwkvx.data.datasets import check_data_vocab as _check_vocab
from megatron_rwkvx.data.indexed import idx_path, loss_mask_prefix
from megatron_rwkvx.data.tokenizers import build_tokenizer

_SPLITS = {"train": 0, "valid": 1, "test": 2}
_datasets = None


def build_run_tokenizer(args):
    return build_tokenizer(args.tokenizer_type, args.tokenizer_model, vocab_file=args.vocab_file,
                           merge_file=args.merge_file, vocab_size=args.vocab_size)


def check_data_vocab(args, vocab_size: int) -> None:
    """Refuse data with token ids the model cannot embed, before any training."""
    if args.mock_data:
        return  # megatron-core's mock ids are taken modulo the tokenizer's vocabulary
    _check_vocab(args.data_path, vocab_size, args.data_cache_path)


def loss_tokens_line(args) -> Optional[str]:
    """What the training log says about the tokens the loss is on, when it is not every token
    or when a dataset's loss mask goes unused."""
    if args.mock_data:
        return None
    if args.loss_on_spans:
        return "loss: on the tokens that each dataset's loss mask marks (--loss-on-spans)"
    prefixes, _ = parse_data_path(args.data_path)
    masked = [p for p in prefixes if os.path.isfile(idx_path(loss_mask_prefix(p)))]
    if not masked:
        return None
    return (f"note: {', '.join(masked)} {'has a loss mask' if len(masked) == 1 else 'have loss masks'} "
            "(preprocess_data.py --loss-spans-key) that this run does not use: the loss is on every token; "
            "--loss-on-spans trains on the marked spans only")


def _num_samples(args):
    train = args.train_iters * args.global_batch_size
    evals = (args.train_iters // max(args.eval_interval, 1) + 1) * args.eval_iters
    valid = evals * args.global_batch_size if args.eval_iters > 0 else 0
    return [train, valid, 0]


def _get_datasets(args, tokenizer):
    global _datasets
    if _datasets is None and args.mock_data:
        _datasets = build_mock_gpt_datasets(args.split, args.seq_length, args.seed, _num_samples(args), tokenizer)
    if _datasets is None:
        _datasets = build_gpt_datasets(
            args.data_path, args.split, args.seq_length, args.seed, _num_samples(args),
            args.data_cache_path, tokenizer, loss_on_spans=args.loss_on_spans,
        )
    return _datasets


def build_data_iterators(args, tokenizer, split: str, consumed_samples: int) -> Iterator[Dict]:
    dataset = _get_datasets(args, tokenizer)[_SPLITS[split]]
    if dataset is None:
        raise DataConfigError(
            f"the {split} split is empty: give it a share in --split (now {args.split!r}) or set "
            "--eval-iters 0"
        )
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()

    def make(consumed):
        return DataParallelBatches(dataset, args.micro_batch_size, dp_rank, dp_size, consumed,
                                   num_workers=args.num_workers if split == "train" else 0)

    # Validation reads the same first batches at every evaluation, so the curve compares like
    # with like (and a resumed run evaluates exactly as an uninterrupted one).
    return make(consumed_samples if split == "train" else 0)
