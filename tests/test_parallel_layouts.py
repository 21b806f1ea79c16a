"""Every parallel layout gives the single-process loss and parameters after one optimizer step."""
import pytest
import torch

from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.testing.checkpoints import random_official_state_dict
from megatron_rwkvx.testing.distributed import run_distributed
from megatron_rwkvx.testing.layouts import one_training_step

from conftest import TINY

CFG = dict(TINY, layer_pattern="RRAR", sparse_chunk_size=4, sparse_top_k=2)
SEQ = 16
GLOBAL_BATCH = 4
MICRO_BATCH = 1


def _setup(tmp_path_factory, cfg, optimizers):
    path = tmp_path_factory.mktemp("layouts") / "rand.pth"
    torch.save(random_official_state_dict(RWKVXConfig(**cfg), seed=21), path)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg["vocab_size"], (GLOBAL_BATCH, SEQ), generator=g)
    labels = torch.randint(0, cfg["vocab_size"], (GLOBAL_BATCH, SEQ), generator=g)
    references = {
        opt: run_distributed(one_training_step, 1, {"optimizer": opt}, cfg, str(path), tokens,
                             labels, MICRO_BATCH)[0]
        for opt in optimizers
    }
    return str(path), tokens, labels, references


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _setup(tmp_path_factory, CFG, ("sgd", "adam"))


def _check(result, reference):
    loss, params = result
    ref_loss, ref_params = reference
    assert abs(loss - ref_loss) / abs(ref_loss) < 1e-5, (loss, ref_loss)
    assert params.keys() == ref_params.keys()
    for k in ref_params:
        a, b = params[k], ref_params[k]
        # Norm-wise relative error: fp32 sums taken in another order differ by rounding only.
        err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
        assert err < 1e-5, f"{k}: relative error {err:.2e}"


LAYOUTS = {
    "tp2": ({"tp": 2}, 2),
    "tp2-sp": ({"tp": 2, "sp": True}, 2),
    "pp2": ({"pp": 2}, 2),
    "pp2-vpp2": ({"pp": 2, "vpp": 2}, 2),
    # megatron's distributed optimizer only takes Adam.
    "dp2-distopt": ({"dist_opt": True, "optimizer": "adam"}, 2),
    "tp2xpp2": ({"tp": 2, "pp": 2}, 4),
    "cp2": ({"cp": 2}, 2),
    "cp4": ({"cp": 4}, 4),
    "tp2xcp2": ({"tp": 2, "cp": 2, "sp": True}, 4),
    "pp2xcp2": ({"pp": 2, "cp": 2}, 4),
}


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(setup, name):
    path, tokens, labels, references = setup
    layout, world = LAYOUTS[name]
    result = run_distributed(one_training_step, world, layout, CFG, path, tokens, labels, MICRO_BATCH)[0]
    _check(result, references[layout.get("optimizer", "sgd")])


# The sparse blocks' token-shift mixes are replicated parameters fed the gathered sequence (their
# gradients are summed over TP) and, with CP, the previous rank's last token.
SHIFT_CFG = dict(CFG, sparse_token_shift=True)


@pytest.fixture(scope="module")
def shift_setup(tmp_path_factory):
    return _setup(tmp_path_factory, SHIFT_CFG, ("sgd",))


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["tp2-sp", "cp2"])
def test_sparse_token_shift_layout_matches_single_process(shift_setup, name):
    path, tokens, labels, references = shift_setup
    layout, world = LAYOUTS[name]
    result = run_distributed(one_training_step, world, layout, SHIFT_CFG, path, tokens, labels, MICRO_BATCH)[0]
    _check(result, references["sgd"])
