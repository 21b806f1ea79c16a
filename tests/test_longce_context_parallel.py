"""LongCE under context parallelism: the short-context windows spread over the CP ranks give the
CP=1 short losses, token weights, loss and parameters after a step (1e-5)."""
import pytest
import torch

from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.testing.checkpoints import random_official_state_dict
from megatron_rwkvx.testing.distributed import run_distributed
from megatron_rwkvx.testing.layouts import one_training_step

from conftest import TINY

CFG = dict(TINY, layer_pattern="RRAR", sparse_chunk_size=4, sparse_top_k=2)
SEQ = 32
# 6 windows of 8 tokens scoring 4 each: an even split at CP2, an uneven one at CP4.
LONGCE = dict(loss="longce", longce_window=8, longce_stride=4, longce_tau=10.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("longce") / "rand.pth"
    torch.save(random_official_state_dict(RWKVXConfig(**CFG), seed=11), path)
    g = torch.Generator().manual_seed(13)
    tokens = torch.randint(0, CFG["vocab_size"], (2, SEQ), generator=g)
    labels = torch.randint(0, CFG["vocab_size"], (2, SEQ), generator=g)
    return str(path), tokens, labels


def _weights(rank, world, cp, tp, path, tokens, labels):
    """(short losses, scored mask, token weights of the whole sequence) at this layout."""
    from megatron.core import parallel_state

    from megatron_rwkvx.checkpointing.official_format import import_state_dict, load_state_dict_file
    from megatron_rwkvx.models.rwkvx_model import RWKVXModel
    from megatron_rwkvx.testing.distributed import initialize_parallel
    from megatron_rwkvx.training.loop import _cp_slice
    from megatron_rwkvx.training.losses import longce_short_context_losses, longce_weights

    initialize_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    cfg = RWKVXConfig(context_parallel_size=cp, tensor_model_parallel_size=tp,
                      use_cpu_initialization=True, **CFG)
    model = RWKVXModel(cfg)
    import_state_dict(model, load_state_dict_file(path), cfg)
    short, scored = longce_short_context_losses(
        model, tokens, labels, LONGCE["longce_window"], LONGCE["longce_stride"])
    with torch.no_grad():
        long = model(_cp_slice(tokens), labels=_cp_slice(labels))
    w = longce_weights(long, _cp_slice(short), _cp_slice(scored), LONGCE["longce_tau"])
    parts = [torch.empty_like(w) for _ in range(cp)]
    torch.distributed.all_gather(parts, w, group=parallel_state.get_context_parallel_group())
    return short, scored, torch.cat(parts, dim=1)


@pytest.mark.distributed
@pytest.mark.parametrize("cp, tp", [(2, 1), (4, 1), (2, 2)])
def test_longce_weights_at_cp_equal_cp1(setup, cp, tp):
    path, tokens, labels = setup
    ref_short, ref_scored, ref_w = run_distributed(_weights, 1, 1, 1, path, tokens, labels)[0]
    assert ref_scored[:, 8:].all() and not ref_scored[:, :8].any()
    assert (ref_w != 1).any()  # the weights are not trivially 1
    for short, scored, w in run_distributed(_weights, cp * tp, cp, tp, path, tokens, labels):
        assert torch.equal(scored, ref_scored)
        assert torch.allclose(short, ref_short, rtol=1e-5, atol=1e-6)
        assert torch.allclose(w, ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_longce_training_step_at_cp2_equals_cp1(setup):
    path, tokens, labels = setup
    # SGD with a huge step: the parameters after it are ~ -lr x gradient, so their relative error
    # is the gradient's (of the LongCE-weighted loss).
    lr = 1e4
    ref_loss, ref = run_distributed(one_training_step, 1, {}, CFG, path, tokens, labels, 1,
                                    lr, LONGCE)[0]
    loss, params = run_distributed(one_training_step, 2, {"cp": 2}, CFG, path, tokens, labels, 1,
                                   lr, LONGCE)[0]
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for k, p in ref.items():
        err = ((params[k] - p).norm() / p.norm().clamp_min(1e-12)).item()
        assert err < 1e-5, f"{k}: relative error {err:.2e}"
