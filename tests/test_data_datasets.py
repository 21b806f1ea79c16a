"""Training datasets over megatron-core: blends, splits, seeded order, resumable data-parallel batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_rwkvx.data.datasets import (
    DataConfigError,
    DataParallelBatches,
    build_gpt_datasets,
    build_mock_gpt_datasets,
    check_data_vocab,
    parse_data_path,
)
from megatron_rwkvx.data.indexed import DatasetFileError

SEQ = 32
VOCAB = 500


class _Tok:
    """Minimal tokenizer for datasets built straight from token ids."""

    vocab_size = VOCAB
    eod = 0
    unique_identifiers = {"class": "TestTokenizer"}


def make_dataset(prefix, num_docs, seed, high=VOCAB):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(num_docs):
        doc = np.append(rng.integers(1, high, rng.integers(5, 120)), 0)
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return make_dataset(str(d / "a_text_document"), 300, 1), make_dataset(str(d / "b_text_document"), 200, 2)


def test_parse_data_path():
    assert parse_data_path(["p"]) == (["p"], None)
    assert parse_data_path(["p", "q"]) == (["p", "q"], None)
    assert parse_data_path(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    with pytest.raises(DataConfigError, match="must alternate"):
        parse_data_path(["0.7", "a", "b"])
    with pytest.raises(DataConfigError, match="not non-negative weights"):
        parse_data_path(["0.7", "a", "x", "b"])
    with pytest.raises(DataConfigError, match="empty"):
        parse_data_path([])


def _samples(ds, n):
    return [ds[i]["tokens"].tolist() for i in range(n)]


def test_single_and_blended_splits_are_seeded_and_cached(prefixes, tmp_path):
    a, b = prefixes
    train, valid, test = build_gpt_datasets([a], "90,8,2", SEQ, 1234, [50, 10, 2], str(tmp_path / "c1"), _Tok())
    assert len(train) >= 50 and len(valid) >= 10 and len(test) >= 2
    s = train[0]
    assert s["tokens"].shape == (SEQ,) and torch.equal(s["tokens"][1:], s["labels"][:-1])
    again = build_gpt_datasets([a], "90,8,2", SEQ, 1234, [50, 10, 2], str(tmp_path / "c1"), _Tok())[0]
    assert _samples(train, 20) == _samples(again, 20)
    other = build_gpt_datasets([a], "90,8,2", SEQ, 99, [50, 10, 2], str(tmp_path / "c2"), _Tok())[0]
    assert _samples(train, 20) != _samples(other, 20)

    blend = build_gpt_datasets(["0.75", a, "0.25", b], "1,0,0", SEQ, 1234, [400, None, None],
                               str(tmp_path / "c3"), _Tok())
    assert blend[1] is None and blend[2] is None
    ids = np.array([blend[0][i]["dataset_id"] for i in range(400)])
    assert abs((ids == 0).mean() - 0.75) < 0.02


def test_mock_and_real_samples_have_one_layout(prefixes, tmp_path):
    """--mock-data stands in for a dataset in smoke runs: its samples must be shaped like real ones."""
    real = build_gpt_datasets([prefixes[0]], "90,10,0", SEQ, 1234, [8, 2, None], str(tmp_path / "c"), _Tok())
    mock = build_mock_gpt_datasets("90,10,0", SEQ, 1234, [8, 2, None], _Tok())
    assert real[2] is None and mock[2] is None
    for r, m in zip(real[:2], mock[:2]):
        a, b = r[0], m[0]
        assert sorted(a) == sorted(b) and "attention_mask" not in b
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert a[key].shape == b[key].shape == (SEQ,) and a[key].dtype == b[key].dtype, key
        assert torch.equal(a["position_ids"], b["position_ids"])
        assert torch.equal(b["tokens"][1:], b["labels"][:-1])


def test_batches_are_resumable_and_partition_data_parallel_ranks(prefixes, tmp_path):
    train = build_gpt_datasets([prefixes[0]], "1,0,0", SEQ, 7, [64, None, None], str(tmp_path / "c"), _Tok())[0]
    full = [DataParallelBatches(train, 2, r, 2) for r in range(2)]
    steps = [[next(it) for it in full] for _ in range(4)]  # 4 steps x 2 ranks x 2 samples
    b = steps[0][1]
    assert set(b) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert b["tokens"].shape == (2, SEQ) and b["tokens"].dtype == torch.int64 and b["loss_mask"].dtype == torch.float32
    seen = torch.cat([s[r]["tokens"] for s in steps for r in range(2)])
    expected = torch.stack([train[i]["tokens"] for i in range(16)])
    assert torch.equal(seen.sort(0).values, expected.sort(0).values)  # every sample once, none twice
    assert torch.equal(steps[1][1]["tokens"], torch.stack([train[6]["tokens"], train[7]["tokens"]]))
    resumed = DataParallelBatches(train, 2, 1, 2, consumed_samples=8)  # after two steps
    assert torch.equal(next(resumed)["tokens"], steps[2][1]["tokens"])
    assert resumed.consumed_samples == 12
    with pytest.raises(DataConfigError, match="outside the dataset"):
        DataParallelBatches(train, 2, 0, 2, consumed_samples=len(train) + 1)
    with pytest.raises(DataConfigError, match="data_parallel_rank 2"):
        DataParallelBatches(train, 2, 2, 2)


def test_bad_datasets_are_reported(prefixes, tmp_path):
    with pytest.raises(DatasetFileError, match="does not exist"):
        build_gpt_datasets([str(tmp_path / "missing")], "1,0,0", SEQ, 1, [4, None, None], None, _Tok())
    big = make_dataset(str(tmp_path / "big_text_document"), 20, 3, high=VOCAB + 50)
    with pytest.raises(DatasetFileError, match=f"vocabulary has {VOCAB} rows"):
        check_data_vocab([big], VOCAB)
    check_data_vocab(["1", prefixes[0]], VOCAB)
    with pytest.raises(DataConfigError, match="--split"):
        build_gpt_datasets([prefixes[0]], "a,b", SEQ, 1, [4, None, None], None, _Tok())


def _gloo_body(rank, world_size, prefix, cache):
    ds = build_gpt_datasets([prefix], "1,0,0", SEQ, 5, [16, None, None], cache, _Tok())[0]
    batch = next(DataParallelBatches(ds, 2, rank, world_size))
    return batch["tokens"]


@pytest.mark.distributed
def test_builds_under_gloo(prefixes, tmp_path):
    from megatron_rwkvx.testing.distributed import run_distributed

    cache = str(tmp_path / "cache")
    got = run_distributed(_gloo_body, 2, prefixes[0], cache)
    single = build_gpt_datasets([prefixes[0]], "1,0,0", SEQ, 5, [16, None, None], cache, _Tok())[0]
    assert torch.equal(got[0], torch.stack([single[0]["tokens"], single[1]["tokens"]]))
    assert torch.equal(got[1], torch.stack([single[2]["tokens"], single[3]["tokens"]]))
