"""The chunk selection rule (``sparse_selection``): ``mean`` (the reference's mean key) or ``quest``
(Quest's bound). The bound against a brute force, a case where the two rules disagree, every CPU
backend and decoding under ``quest``, and the option through config, training
arguments, checkpoints and loading. The Triton kernels under ``quest`` are in
test_sparse_attention_triton.py, context parallelism in test_context_parallel_ops.py, the decode
cache on its own in test_inference_decode.py."""
from __future__ import annotations

import pytest
import torch

import megatron_rwkvx
from megatron_rwkvx.checkpointing.megatron_format import (
    load_model_checkpoint,
    read_model_config,
    save_model_checkpoint,
)
from megatron_rwkvx.checkpointing.official_format import REFERENCE_RWKVX
from megatron_rwkvx.config import ConfigError, RWKVXConfig
from megatron_rwkvx.inference import InferenceEngine
from megatron_rwkvx.inference.loading import load_model
from megatron_rwkvx.kernels.sparse_attention import (
    chunk_selection_keys,
    select_chunks,
    selection_queries,
    topk_chunk_attention,
    topk_chunk_selection,
)
from megatron_rwkvx.models.rwkvx_model import RWKVXModel
from megatron_rwkvx.pretrained import prepare_runtime, read_file_config, write_file_config
from megatron_rwkvx.testing.checkpoints import random_official_state_dict
from megatron_rwkvx.training.arguments import parse_args
from megatron_rwkvx.training.model_builder import build_config

from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def _brute_force_quest(q, k, chunk_size, top_k, position, head, kv_head):
    """The ``top_k - 1`` past chunks of the largest bound, written out per chunk and dimension."""
    bounds = []
    for c in range(position // chunk_size):
        keys = k[c * chunk_size : (c + 1) * chunk_size, kv_head]  # [chunk, D]
        qv = q[position, head]
        bounds.append(sum(max(float(qv[d] * keys[:, d].max()), float(qv[d] * keys[:, d].min()))
                          for d in range(qv.shape[0])))
    # Highest bound first, ties to the lower chunk index.
    order = sorted(range(len(bounds)), key=lambda c: (-bounds[c], c))
    return order[: top_k - 1], bounds


def test_quest_selects_the_largest_bound_and_bounds_every_key():
    g = torch.Generator().manual_seed(5)
    b, t, hq, hkv, d, cs, top_k = 1, 70, 4, 2, 6, 8, 4
    q = torch.randn(b, t, hq, d, generator=g)
    k = torch.randn(b, t, hkv, d, generator=g)
    _, selected = topk_chunk_selection(q, k, chunk_size=cs, top_k=top_k, selection="quest")
    for position in (8, 23, 40, 69):
        for head in range(hq):
            want, bounds = _brute_force_quest(q[0], k[0], cs, top_k, position, head, head // (hq // hkv))
            got = [c for c in selected[0, head, position].tolist() if c >= 0]
            assert got == want, (position, head)
            for c, bound in enumerate(bounds):  # an upper bound of every key's score in the chunk
                scores = k[0, c * cs : (c + 1) * cs, head // (hq // hkv)] @ q[0, position, head]
                assert scores.max().item() <= bound + 1e-5


def test_one_matching_key_is_found_by_the_bound_and_lost_in_the_mean():
    # Chunk 1 holds a single key along the query; chunk 0's keys all lean a little its way. The
    # mean key prefers chunk 0, the bound chunk 1 (findings 6 and 21 of docs/retrieval_study.md).
    d, cs = 4, 16
    q = torch.zeros(1, 3 * cs, 1, d)
    q[0, -1, 0, 0] = 1.0
    k = torch.zeros(1, 3 * cs, 1, d)
    k[0, :cs, 0, 0] = 0.5
    k[0, cs : 2 * cs, 0, 1] = 1.0
    k[0, cs + 3, 0] = torch.tensor([4.0, 0.0, 0.0, 0.0])
    picks = {rule: topk_chunk_selection(q, k, chunk_size=cs, top_k=2, selection=rule)[1][0, 0, -1, 0].item()
             for rule in ("mean", "quest")}
    assert picks == {"mean": 0, "quest": 1}


def test_the_bound_is_the_dot_product_of_the_selection_queries_and_keys():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 1, 8, generator=g)
    k = torch.randn(1, 32, 1, 8, generator=g).half()  # max/min in k's dtype, then fp32
    keys = chunk_selection_keys(k, 16, selection="quest")
    assert keys.shape == (1, 2, 1, 16) and keys.dtype == torch.float32
    chunks = k.float().view(2, 16, 8)
    want = torch.maximum(q[0, 0, 0] * chunks.amax(1), q[0, 0, 0] * chunks.amin(1)).sum(-1)
    got = (selection_queries(q, "quest")[0, 0, 0] * keys[0, :, 0]).sum(-1)
    torch.testing.assert_close(got, want)
    assert selection_queries(q, "mean") is q
    torch.testing.assert_close(chunk_selection_keys(k, 16, selection="mean"), chunks.mean(1)[None, :, None])


@pytest.mark.parametrize("offset", [0, 13])
def test_torch_backend_equals_the_reference_under_quest(offset):
    g = torch.Generator().manual_seed(7)
    b, tq, hq, hkv, d, cs, top_k = 2, 60, 4, 2, 8, 8, 3
    q = torch.randn(b, tq, hq, d, generator=g)
    k = torch.randn(b, tq + offset, hkv, d, generator=g)
    v = torch.randn(b, tq + offset, hkv, d, generator=g)
    grad = torch.randn(b, tq, hq, d, generator=g)
    results = {}
    for backend in ("reference", "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = topk_chunk_attention(*leaves, chunk_size=cs, top_k=top_k, q_offset=offset, backend=backend,
                                   selection="quest")
        out.backward(grad)
        results[backend] = [out.detach()] + [t.grad for t in leaves]
    for got, want in zip(results["torch"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mean = topk_chunk_attention(q, k, v, chunk_size=cs, top_k=top_k, q_offset=offset, backend="torch")
    assert (mean - results["torch"][0]).abs().max() > 1e-3, "the two rules should select differently here"


def test_an_unknown_rule_is_refused_naming_the_choices():
    q = torch.randn(1, 16, 1, 4)
    with pytest.raises(ValueError, match="mean, quest.*'max'"):
        topk_chunk_attention(q, q, q, chunk_size=4, top_k=2, selection="max")
    with pytest.raises(ConfigError, match="sparse_selection 'max' is unknown"):
        RWKVXConfig(sparse_selection="max", layer_pattern="RA", **TINY)


CFG = dict(TINY, layer_pattern="RRARRA", sparse_chunk_size=8, sparse_top_k=3)
IDS = torch.randint(0, TINY["vocab_size"], (2, 60), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hybrid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("selection") / "hybrid.pth"
    torch.save(random_official_state_dict(RWKVXConfig(**CFG), seed=3, layout=REFERENCE_RWKVX), path)
    return str(path)


def test_a_quest_model_decodes_as_it_computes(hybrid_file):
    model = megatron_rwkvx.load_pretrained(hybrid_file, sparse_chunk_size=8, sparse_top_k=3, sparse_selection="quest")
    mean = megatron_rwkvx.load_pretrained(hybrid_file, sparse_chunk_size=8, sparse_top_k=3)
    with torch.no_grad():
        full, full_mean = model(IDS), mean(IDS)
    assert (full - full_mean).abs().max() / full.abs().max() > 1e-3, "the rule changed nothing here"
    engine = InferenceEngine(model)
    state = engine.new_state(2)
    steps = torch.stack([engine.decode(state, IDS[:, t]) for t in range(IDS.shape[1])], dim=1)
    assert ((steps - full).abs().max() / full.abs().max()).item() < 1e-5


TRAIN = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--seq-length", "48",
         "--micro-batch-size", "1", "--global-batch-size", "1", "--device", "cpu", "--lr", "1e-3",
         "--train-iters", "2"]
SHAPE = ["--layer-pattern", "RRARRA", "--hidden-size", "64", "--head-size", "16", "--sparse-chunk-size", "8"]


def test_the_rule_is_saved_and_a_stage_inherits_or_changes_it(tmp_path):
    prepare_runtime(torch.device("cpu"))
    args = parse_args([*TRAIN, *SHAPE], world_size=1)
    assert build_config(args, 128).sparse_selection == "mean"  # the reference's, by default
    cfg = build_config(parse_args([*TRAIN, *SHAPE, "--sparse-selection", "quest"], world_size=1), 128)
    assert cfg.sparse_selection == "quest"
    model = RWKVXModel(RWKVXConfig(use_cpu_initialization=True, **{**CFG, "sparse_selection": "quest"}),
                       parallel_output=False)
    directory = str(tmp_path / "ckpt")
    save_model_checkpoint(model, model.config, directory, iteration=1)
    assert read_model_config(directory)["sparse_selection"] == "quest"
    # The next stage takes it from --init-from, or changes it: a training choice, not a shape.
    follow = parse_args([*TRAIN, "--init-from", directory, "--sparse-chunk-size", "8"], world_size=1)
    assert build_config(follow, 128).sparse_selection == "quest"
    change = parse_args([*TRAIN, "--init-from", directory, "--sparse-selection", "mean"], world_size=1)
    assert build_config(change, 128).sparse_selection == "mean"
    mean_model = RWKVXModel(RWKVXConfig(use_cpu_initialization=True, **CFG), parallel_output=False)
    load_model_checkpoint(mean_model, mean_model.config, directory)  # not refused
    # Loading for evaluation keeps it, and may read the weights through the other rule.
    assert load_model(directory).config.sparse_selection == "quest"
    assert load_model(directory, sparse_selection="mean").config.sparse_selection == "mean"


def test_a_file_config_carries_it_and_an_old_one_means_mean(hybrid_file, tmp_path):
    assert megatron_rwkvx.load_pretrained(hybrid_file, sparse_chunk_size=8).config.sparse_selection == "mean"
    write_file_config(hybrid_file, {**{k: v for k, v in CFG.items()}, "sparse_selection": "quest"})
    try:
        assert read_file_config(hybrid_file)["sparse_selection"] == "quest"
        assert megatron_rwkvx.load_pretrained(hybrid_file).config.sparse_selection == "quest"
        write_file_config(hybrid_file, dict(CFG))  # written before the field existed
        assert read_file_config(hybrid_file)["sparse_selection"] == "mean"
    finally:
        import os

        os.remove(hybrid_file + ".json")
