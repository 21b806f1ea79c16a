"""Training datasets over megatron-core's ``GPTDataset`` and ``BlendedMegatronDatasetBuilder``.

``build_gpt_datasets`` turns a Megatron-style ``--data-path`` (``["prefix"]`` or
``["0.7", "prefixA", "0.3", "prefixB"]``) and ``--split`` into train/valid/test datasets whose
sample order is fixed by the seed (megatron-core shuffles with it and caches the index arrays).
With ``loss_on_spans`` the datasets are ``span_loss.SpanLossGPTDataset``: the loss mask of each sample is
also cut by the marks that ``preprocess_data.py --loss-spans-key`` wrote beside its tokens.
``DataParallelBatches`` walks one of them as Megatron-LM's pretraining sampler does: global
sample ``consumed + k`` goes to data-parallel rank ``(k // micro_batch) % dp``, so resuming from
``consumed_samples`` continues exactly where a run stopped, for any rank.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_rwkvx.data.indexed import (
    DatasetFileError,
    check_token_ids,
    validate_indexed_dataset,
    validate_loss_mask,
)
from megatron_rwkvx.errors import UsageError

__all__ = [
    "BATCH_KEYS", "SPLIT_NAMES", "DataConfigError", "DataParallelBatches", "DatasetFileError",
    "build_gpt_datasets", "build_mock_gpt_datasets", "check_data_vocab", "parse_data_path", "parse_split",
]

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
SPLIT_NAMES = ("train", "valid", "test")


class DataConfigError(UsageError):
    """--data-path, --split or sample counts that cannot work."""


def parse_data_path(data_path: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """``(prefixes, weights)``; weights is None for an unweighted list of prefixes."""
    items = [str(x) for x in (data_path or [])]
    if not items:
        raise DataConfigError("--data-path is empty: give a dataset prefix (from tools/preprocess_data.py)")

    def number(s):
        try:
            return float(s)
        except ValueError:
            return None

    if len(items) == 1 or number(items[0]) is None:
        return items, None
    if len(items) % 2:
        raise DataConfigError(f"--data-path {items}: weights and prefixes must alternate ('0.7 pathA 0.3 pathB')")
    weights, prefixes = [number(w) for w in items[0::2]], items[1::2]
    bad = [items[2 * i] for i, w in enumerate(weights) if w is None or w < 0]
    if bad:
        raise DataConfigError(f"--data-path: {bad} are not non-negative weights; write 'w1 prefix1 w2 prefix2 ...'")
    zero = [prefixes[i] for i, w in enumerate(weights) if w == 0]
    if zero:
        # megatron-core's BlendedDataset asserts that every weight is positive.
        raise DataConfigError(f"--data-path gives {', '.join(zero)} weight 0, and megatron-core blends "
                              "positive weights only: leave it out")
    return prefixes, weights


def parse_split(split: str) -> List[float]:
    parts = [p for p in re.split(r"[,/]", split.strip()) if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = None
    if not values or len(values) > 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise DataConfigError(f"--split {split!r}: expected up to three non-negative numbers, e.g. '949,50,1'")
    return values + [0.0] * (3 - len(values))


def _gpt_dataset_config(seed: int, seq_length: int, shares: Sequence[float], tokenizer,
                        eod_mask_loss: bool, **source):
    """The one ``GPTDatasetConfig`` of real and mock data: the sample layout our batches assume
    (plain position ids, no attention mask: the model is causal by construction) and ``source``,
    where the documents come from (``blend``, ``path_to_cache``, ...; none for mock data)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        split=",".join(str(s) for s in shares),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
        **source,
    )


def build_gpt_datasets(data_path: Sequence[str], split: str, seq_length: int, seed: int,
                       num_samples: Sequence[Optional[int]], cache_dir: Optional[str], tokenizer,
                       eod_mask_loss: bool = False, loss_on_spans: bool = False) -> list:
    """``[train, valid, test]`` (None for a split with no share) of at least ``num_samples[i]`` samples.

    Every rank calls this; under ``torch.distributed`` megatron-core builds the index cache on
    rank 0 first and the other ranks read it. ``cache_dir`` defaults to ``index-cache`` beside
    the first dataset. ``loss_on_spans``: the loss only on the tokens that each dataset's loss
    mask marks (``span_loss.SpanLossGPTDataset``); every dataset must have one.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    prefixes, weights = parse_data_path(data_path)
    shares = parse_split(split)
    if seq_length < 1:
        raise DataConfigError(f"seq_length must be positive, got {seq_length}")
    if len(num_samples) != 3:
        raise DataConfigError("num_samples needs one entry per split: (train, valid, test)")
    cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index-cache")
    infos = [validate_indexed_dataset(prefix) for prefix in prefixes]
    if loss_on_spans:
        for prefix in prefixes:
            validate_loss_mask(prefix, cache_dir)
    for prefix, info in zip(prefixes, infos):
        if info.num_tokens <= seq_length:
            raise DataConfigError(
                f"dataset {prefix!r} has {info.num_tokens} tokens, not enough for one sample of "
                f"{seq_length} + 1; use more data or a shorter --seq-length"
            )
    sizes = [None if s is None else int(s) for s in num_samples]
    for name, want, share in zip(SPLIT_NAMES, sizes, shares):
        if want and share <= 0:
            raise DataConfigError(
                f"{want} {name} samples are asked for, but --split {split!r} gives the {name} split "
                f"no share: give it one{_SPLIT_FIXES[name]}"
            )
    # megatron-core wants a number, not None, for every split of a weighted blend, even unused ones.
    sizes = [s if share > 0 else 0 for s, share in zip(sizes, shares)]
    if weights is not None and any(s is None and share > 0 for s, share in zip(sizes, shares)):
        raise DataConfigError("a weighted --data-path needs a sample count for every split with a share")
    config = _gpt_dataset_config(seed, seq_length, shares, tokenizer, eod_mask_loss,
                                 blend=(prefixes, weights), path_to_cache=cache_dir,
                                 mid_level_dataset_surplus=0.005)
    for i in _check_split_ranges(config, prefixes, infos, weights, sizes, seq_length, split):
        # Nobody reads this split, but megatron-core would still build it and, with no documents
        # and a sample count of 0, never finish; leaving it out changes no other split's documents.
        config.split_matrix[i] = None
    if loss_on_spans:
        from megatron_rwkvx.data.span_loss import SpanLossGPTDataset as dataset_class
    else:
        dataset_class = GPTDataset
    with _rank_zero_without_distributed():
        datasets = BlendedMegatronDatasetBuilder(dataset_class, sizes, lambda: True, config).build()
    for name, ds, want in zip(SPLIT_NAMES, datasets, sizes):
        if want and ds is not None and len(ds) < want:
            raise DataConfigError(f"the {name} split has {len(ds)} samples, {want} were asked for")
    return datasets


def build_mock_gpt_datasets(split: str, seq_length: int, seed: int, num_samples: Sequence[Optional[int]],
                            tokenizer) -> list:
    """``--mock-data``: megatron-core's ``MockGPTDataset`` (ramps of token ids ending in the
    tokenizer's end of document) with the real sampler, splits and shapes, for smoke runs of a
    layout or a cluster without a dataset."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import MockGPTDataset

    shares = parse_split(split)
    config = _gpt_dataset_config(seed, seq_length, shares, tokenizer, eod_mask_loss=False)
    sizes = [int(n or 0) if share > 0 else None for n, share in zip(num_samples, shares)]
    for i, share in enumerate(shares):
        if share <= 0:
            config.split_matrix[i] = None
    with _rank_zero_without_distributed():
        return BlendedMegatronDatasetBuilder(MockGPTDataset, sizes, lambda: True, config).build()


_SPLIT_FIXES = {
    "train": "",
    "valid": ", or set --eval-iters 0 to train without validation",
    "test": "",
}


def _check_split_ranges(config, prefixes: List[str], infos: list, weights: Optional[List[float]],
                        sizes: List[Optional[int]], seq_length: int, split: str) -> List[int]:
    """Refuse a split that samples are asked of but that some dataset of the blend cannot give
    one sample for; return the splits nobody asks samples of that megatron-core could not build.

    megatron-core 0.16.1 gives each dataset's split the sequences ``round(bookend * numel)`` of
    ``config.split_matrix`` (``BlendedMegatronDatasetBuilder._build_megatron_dataset_splits``) and
    asks it for ``_get_size_per_split_per_dataset`` samples in a weighted blend, the split's size
    for a single dataset, and one epoch in an unweighted blend. A split without tokens asked for
    any number of samples (0 included) never leaves ``GPTDataset._get_num_epochs``; one with fewer
    tokens than a sample repeats one fragment over and over; a dataset without a sample in an
    unweighted blend fails ``BlendedDataset``'s weight assertion.
    """
    import numpy as np
    from megatron.core.datasets.blended_megatron_dataset_builder import _get_size_per_split_per_dataset
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.utils import normalize

    unweighted_blend = weights is None and len(prefixes) > 1
    if weights is not None:
        asks = _get_size_per_split_per_dataset(normalize(weights), sizes, surplus=config.mid_level_dataset_surplus)
    elif unweighted_blend:
        asks = [[None] * len(SPLIT_NAMES) for _ in prefixes]
    else:
        asks = [list(sizes)]
    need = seq_length + 1  # one sample's tokens and the label after them

    datasets = []  # per dataset: (prefix, unit, numel, [(sequences, tokens) or None per split])
    for prefix, info in zip(prefixes, infos):
        low_level = GPTDataset.build_low_level_dataset(prefix, config)
        numel = GPTDataset.numel_low_level_dataset(low_level)
        lengths = np.asarray(low_level.sequence_lengths)
        ranges = []
        for bookends in config.split_matrix:
            if bookends is None:
                ranges.append(None)
                continue
            beg = int(round(bookends[0] * float(numel)))
            end = int(round(bookends[1] * float(numel)))
            ranges.append((end - beg, int(lengths[beg:end].sum(dtype=np.int64))))
        # megatron-core splits by sequence; preprocess_data.py writes one per document.
        unit = "documents" if info.num_sequences == info.num_documents else "sequences"
        datasets.append((prefix, unit, numel, ranges))
        del low_level, lengths

    unbuildable = []
    for i, name in enumerate(SPLIT_NAMES):
        if config.split_matrix[i] is None:
            continue
        short = [(d, a[i]) for d, a in zip(datasets, asks) if d[3][i][1] < need]
        if sizes[i] == 0:
            # Drop it only where megatron-core would fail: it stays in every other case, so that
            # the index caches (whose names hash the split matrix) of working setups stay valid.
            if any(unweighted_blend or ranges[i][1] == 0 for (_, _, _, ranges), _ in short):
                unbuildable.append(i)
            continue
        for (prefix, unit, numel, ranges), ask in short:
            count, tokens = ranges[i]
            if ask is None and not unweighted_blend:
                continue  # one epoch of whatever there is, as asked
            where = f"dataset {prefix!r}" if len(prefixes) > 1 else f"--data-path {prefix!r}"
            asked = f"{ask} samples are asked of it" if ask else "the unweighted blend needs one from each dataset"
            raise DataConfigError(
                f"the {name} split of {where} gets {count} of its {numel} {unit} ({tokens} tokens), "
                f"fewer than one sample of {seq_length} + 1 tokens, but {asked}; give the {name} "
                f"split a larger share in --split (now {split!r}), use more data or a shorter "
                f"--seq-length{_SPLIT_FIXES[name]}"
            )
    return unbuildable


@contextlib.contextmanager
def _rank_zero_without_distributed():
    """megatron-core 0.16.1's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` without
    checking ``is_initialized()`` (``GPTDataset`` does check); in a single process without
    ``torch.distributed`` we answer rank 0 for the duration of the build, and change nothing
    when a process group exists."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = original


def check_data_vocab(data_path: Sequence[str], vocab_size: int, cache_dir: Optional[str] = None) -> None:
    """Raise ``DatasetFileError`` if any token id in the datasets is >= ``vocab_size``."""
    prefixes, _ = parse_data_path(data_path)
    check_token_ids(prefixes, vocab_size, cache_dir)


class DataParallelBatches:
    """Deterministic, resumable micro-batches of one data-parallel rank.

    Yields ``{"tokens", "labels", "loss_mask", "position_ids"}`` CPU tensors of shape
    ``[micro_batch_size, seq_length]``. ``consumed_samples`` counts samples over all ranks (as
    Megatron-LM's checkpoints store it) and advances by ``micro_batch_size * data_parallel_size``
    per yielded batch. Iteration stops when a full step no longer fits in the dataset.
    With ``num_workers > 0`` a torch ``DataLoader`` reads the same batches, in the same order,
    in that many worker processes (Megatron-LM's --num-workers).
    """

    def __init__(self, dataset, micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int,
                 consumed_samples: int = 0, num_workers: int = 0):
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise DataConfigError("micro_batch_size and data_parallel_size must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise DataConfigError(f"data_parallel_rank {data_parallel_rank} is outside 0..{data_parallel_size - 1}")
        if consumed_samples < 0 or consumed_samples > len(dataset):
            raise DataConfigError(
                f"consumed_samples {consumed_samples} is outside the dataset's {len(dataset)} samples "
                "(was the checkpoint made with another --data-path, --split or --seq-length?)"
            )
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.rank, self.size = data_parallel_rank, data_parallel_size
        self.consumed_samples = consumed_samples
        self._loader = None
        if num_workers > 0:
            self._loader = iter(torch.utils.data.DataLoader(
                dataset, batch_sampler=self._index_batches(), num_workers=num_workers,
                collate_fn=_collate, pin_memory=torch.cuda.is_available(), persistent_workers=True,
            ))

    def _index_batches(self) -> List[List[int]]:
        """This rank's sample indices, batch by batch, from ``consumed_samples`` on."""
        step = self.micro_batch_size * self.size
        out = []
        for consumed in range(self.consumed_samples, len(self.dataset) - step + 1, step):
            start = consumed + self.rank * self.micro_batch_size
            out.append(list(range(start, start + self.micro_batch_size)))
        return out

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        step = self.micro_batch_size * self.size
        if self._loader is not None:
            batch = next(self._loader)
            self.consumed_samples += step
            return batch
        if self.consumed_samples + step > len(self.dataset):
            raise StopIteration
        start = self.consumed_samples + self.rank * self.micro_batch_size
        samples = [self.dataset[i] for i in range(start, start + self.micro_batch_size)]
        self.consumed_samples += step
        return _collate(samples)


def _collate(samples) -> Dict[str, torch.Tensor]:
    """Samples of megatron-core's GPTDataset as one batch of the dtypes the model takes."""
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in BATCH_KEYS}
    batch["tokens"] = batch["tokens"].long()
    batch["labels"] = batch["labels"].long()
    batch["position_ids"] = batch["position_ids"].long()
    batch["loss_mask"] = batch["loss_mask"].float()
    return batch
