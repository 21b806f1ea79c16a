"""Incremental inference reproduces the full forward: token by token, in prefill pieces, batched
rows at different positions, and (with a chunk cap) consistently between prefill and decode."""
from __future__ import annotations

import pytest
import torch

import megatron_rwkvx
from megatron_rwkvx.checkpointing.official_format import REFERENCE_RWKVX
from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.inference import ChunkedKVCache, InferenceEngine
from megatron_rwkvx.kernels.sparse_attention import topk_chunk_attention
from megatron_rwkvx.testing.checkpoints import random_official_state_dict

from conftest import TINY

PATTERN = "RRARRA"
SPARSE = dict(sparse_chunk_size=8, sparse_top_k=3, layer_pattern=PATTERN)  # T=60: 7 chunks
T = 60


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=[False, True], ids=["reference", "sparse-token-shift"])
def hybrid(tmp_path_factory, request):
    # With sparse_token_shift the decoder must carry each sparse block's last input across calls.
    cfg = RWKVXConfig(layer_pattern=PATTERN, sparse_token_shift=request.param, **TINY)
    path = tmp_path_factory.mktemp("inference") / "hybrid.pth"
    torch.save(random_official_state_dict(cfg, seed=3, layout=REFERENCE_RWKVX), path)
    return megatron_rwkvx.load_pretrained(str(path), **SPARSE)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, TINY["vocab_size"], (2, T), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def full_logits(hybrid, tokens):
    with torch.no_grad():
        return hybrid(tokens)


def assert_close(got, want):
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-5, f"relative error {rel:.2e}"


def test_sparse_selection_matters_for_this_model(hybrid, tokens, full_logits):
    # Guard: if the attention blocks had no effect, the exactness tests below would prove nothing.
    cfg = hybrid.config
    old = cfg.sparse_top_k
    try:
        cfg.sparse_top_k = T  # every past chunk selected: dense causal attention
        with torch.no_grad():
            dense = hybrid(tokens)
    finally:
        cfg.sparse_top_k = old
    assert ((dense - full_logits).abs().max() / full_logits.abs().max()).item() > 1e-2


def test_token_by_token_decode_equals_full_forward(hybrid, tokens, full_logits):
    engine = InferenceEngine(hybrid)
    state = engine.new_state(2)
    steps = [engine.decode(state, tokens[:, t]) for t in range(T)]
    assert_close(torch.stack(steps, dim=1), full_logits)
    assert state.lengths == [T, T]


@pytest.mark.parametrize("pieces", [[7] * 8 + [4], [5, 13, 1, 3, 24, 14], [60]])
def test_prefill_in_pieces_equals_full_forward(hybrid, tokens, full_logits, pieces):
    engine = InferenceEngine(hybrid)
    state = engine.new_state(2)
    out, start = [], 0
    for size in pieces:
        out.append(engine.forward(state, tokens[:, start : start + size]))
        start += size
    assert start == T
    assert_close(torch.cat(out, dim=1), full_logits)


def test_rows_with_different_lengths_decode_together(hybrid, tokens, full_logits):
    engine = InferenceEngine(hybrid)
    n0, n1 = 21, 34
    state = engine.new_state(2)
    last = engine.prefill(state, [tokens[0, :n0].tolist(), tokens[1, :n1].tolist()], piece_size=9)
    assert_close(last[0], full_logits[0, n0 - 1])
    assert_close(last[1], full_logits[1, n1 - 1])
    for step in range(20):
        logits = engine.decode(state, [tokens[0, n0 + step], tokens[1, n1 + step]])
        assert_close(logits[0], full_logits[0, n0 + step])
        assert_close(logits[1], full_logits[1, n1 + step])
    # Only row 1 advances: row 0 must be untouched.
    logits = engine.decode(state, [tokens[1, 54]], rows=[1])
    assert_close(logits[0], full_logits[1, 54])
    assert state.lengths == [41, 55]
    assert_close(engine.decode(state, [tokens[0, 41]], rows=[0])[0], full_logits[0, 41])


@pytest.mark.parametrize("selection", ["mean", "quest"])
def test_cache_decode_matches_operator_with_grouped_heads(selection):
    # The cache on its own: 4 query heads over 2 kv heads, rows at different positions; under each
    # chunk selection rule (the cache stores the rule's chunk keys).
    g = torch.Generator().manual_seed(1)
    b, t, hq, hkv, d, cs, top_k = 2, 45, 4, 2, 8, 4, 3
    q = torch.randn(b, t, hq, d, generator=g)
    k = torch.randn(b, t, hkv, d, generator=g)
    v = torch.randn(b, t, hkv, d, generator=g)
    want = topk_chunk_attention(q, k, v, chunk_size=cs, top_k=top_k, backend="reference", selection=selection)
    cache = ChunkedKVCache(b, hkv, d, chunk_size=cs, top_k=top_k, dtype=torch.float32,
                           device=torch.device("cpu"), selection=selection)
    scale = d**-0.5
    head = cache.attend_prefill(1, q[1, :11], k[1, :11], v[1, :11], scale)
    torch.testing.assert_close(head, want[1, :11], rtol=1e-5, atol=1e-5)
    for step in range(t - 11):
        out = cache.attend_decode([0, 1], torch.stack([q[0, step], q[1, 11 + step]]),
                                  torch.stack([k[0, step], k[1, 11 + step]]),
                                  torch.stack([v[0, step], v[1, 11 + step]]), scale)
        torch.testing.assert_close(out[0], want[0, step], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], want[1, 11 + step], rtol=1e-5, atol=1e-5)
    assert cache.complete == [(t - 11) // cs, t // cs]


def test_chunk_cap_bounds_memory_and_prefill_agrees_with_decode(hybrid, tokens, full_logits):
    # A cap as large as the context changes nothing.
    roomy = InferenceEngine(hybrid, max_cached_chunks=T // 8)
    state = roomy.new_state(2)
    assert_close(roomy.forward(state, tokens), full_logits)

    capped = InferenceEngine(hybrid, max_cached_chunks=2)
    by_token = capped.new_state(2)
    steps = []
    sizes = {}
    for t in range(T):
        steps.append(capped.decode(by_token, tokens[:, t]))
        sizes[t] = by_token.memory_bytes()
    assert sizes[T - 1] == sizes[31]  # constant once the cap is reached
    for st in by_token.layers:
        if hasattr(st, "cache"):
            assert st.cache.complete == [2, 2]
            assert st.cache.capacity == 3
            ids = st.cache.stored_chunk_ids(0)
            assert ids == sorted(ids) and len(ids) == 2
    by_piece = capped.new_state(2)
    pieces = torch.cat([capped.forward(by_piece, tokens[:, s : s + 11]) for s in range(0, T, 11)], dim=1)
    decoded = torch.stack(steps, dim=1)
    assert_close(pieces, decoded)
    # Before the first eviction (3 complete chunks), capped decoding is still exact.
    assert_close(decoded[:, :24], full_logits[:, :24])


def test_eviction_drops_the_least_selected_chunk():
    cache = ChunkedKVCache(1, 1, 2, chunk_size=2, top_k=2, dtype=torch.float32,
                           device=torch.device("cpu"), max_chunks=2)
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # (query, key) per position: chunk 0 keys along e0, chunks 1 and 2 along e1; chunk 2's queries
    # point along e0, so chunk 0 (older) is selected 4 times and chunk 1 never.
    steps = [(e0, e0), (e0, e0), (e1, e1), (e1, e1), (5 * e0, e1), (5 * e0, e1)]
    for q, k in steps:
        cache.attend_decode([0], q[None], k[None], k[None], 1.0)
    assert cache.stored_chunk_ids(0) == [0, 2]
    assert cache.selected_count[0, :2].tolist() == [4, 0]


def test_bad_inputs_are_refused(hybrid):
    engine = InferenceEngine(hybrid)
    state = engine.new_state(1)
    with pytest.raises(ValueError, match="token ids must lie"):
        engine.forward(state, [[TINY["vocab_size"]]])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.prefill(state, [[]])
    with pytest.raises(ValueError, match="max_chunks"):
        InferenceEngine(hybrid, max_cached_chunks=1).new_state(1)
    with pytest.raises(ValueError, match="rows must be distinct"):
        engine.forward(state, [[1]], rows=[3])
