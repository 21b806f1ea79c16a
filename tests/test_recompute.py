"""Activation recomputation: Megatron-LM's flags, and gradients equal to those without it on the
TP2, PP2 and CP2 layouts and with the distributed optimizer at DP2 (fp32, 1e-6)."""
import pytest
import torch

from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.models.recompute import RecomputeError, check_recompute, recompute_units
from megatron_rwkvx.testing.checkpoints import random_official_state_dict
from megatron_rwkvx.testing.distributed import run_distributed
from megatron_rwkvx.testing.layouts import one_training_step
from megatron_rwkvx.training.arguments import ArgumentError, parse_args

from conftest import TINY

CFG = dict(TINY, layer_pattern="RRAR", sparse_chunk_size=4, sparse_top_k=2)
SEQ = 16
MODES = {
    "full-uniform-1": ("full", "uniform", 1),
    "full-uniform-2": ("full", "uniform", 2),
    "full-block-1": ("full", "block", 1),
    "selective": ("selective", None, None),
}
# SGD with a huge step: p1 = p0 - LR g, so (p0 - p1) / LR is the gradient to fp32 rounding of
# p1 (relative 6e-8), whatever p0's size.
LR = 1e4


def _steps(rank, world, layout, path, tokens, labels):
    """Gradients of one step without recomputation, then with each mode, in the same processes."""
    from megatron.core import parallel_state

    from megatron_rwkvx.checkpointing.official_format import load_state_dict_file

    start = load_state_dict_file(path)
    out = {}
    for name, mode in [("none", (None, None, None))] + list(MODES.items()):
        cfg = dict(CFG, recompute_granularity=mode[0], recompute_method=mode[1],
                   recompute_num_layers=mode[2])
        result = one_training_step(rank, world, layout, cfg, path, tokens, labels, 1, lr=LR)
        parallel_state.destroy_model_parallel()
        if result is not None:
            loss, params = result
            out[name] = (loss, {k: (start[k].float() - v) / LR for k, v in params.items()})
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("recompute") / "rand.pth"
    torch.save(random_official_state_dict(RWKVXConfig(**CFG), seed=5), path)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, CFG["vocab_size"], (2, SEQ), generator=g)
    labels = torch.randint(0, CFG["vocab_size"], (2, SEQ), generator=g)
    return str(path), tokens, labels


LAYOUTS = {
    "single": ({}, 1),
    "tp2-sp": ({"tp": 2, "sp": True}, 2),
    "pp2-vpp2": ({"pp": 2, "vpp": 2}, 2),
    "cp2": ({"cp": 2}, 2),
    # The distributed optimizer shards the step over DP ranks and takes only Adam: with eps = 1
    # its first step is lr x g / (|g| + 1) per element, so equal steps mean equal gradients.
    "dp2-distopt": ({"dist_opt": True, "optimizer": "adam"}, 2),
}


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_recompute_gradients_equal_those_without(setup, name):
    path, tokens, labels = setup
    layout, world = LAYOUTS[name]
    out = run_distributed(_steps, world, layout, path, tokens, labels)[0]
    ref_loss, ref = out.pop("none")
    assert any(g.norm() > 0 for g in ref.values())
    for mode, (loss, grads) in out.items():
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (mode, loss, ref_loss)
        for k, g in ref.items():
            err = ((grads[k] - g).norm() / g.norm().clamp_min(1e-12)).item()
            assert err < 1e-6, f"{mode} {k}: relative gradient error {err:.2e}"


def test_recompute_units_follow_megatron():
    assert recompute_units(5, "uniform", 2) == ((0, 2, True), (2, 4, True), (4, 5, True))
    assert recompute_units(5, "block", 2) == ((0, 1, True), (1, 2, True), (2, 5, False))
    assert recompute_units(2, "block", 2) == ((0, 1, True), (1, 2, True))


@pytest.mark.parametrize("flags, message", [
    (("full", None, 2), "needs --recompute-method"),
    (("full", "uniform", None), "needs --recompute-num-layers"),
    (("full", "block", 0), "needs --recompute-num-layers"),
    (("selective", "uniform", None), "drop --recompute-method"),
    ((None, "block", 2), "need --recompute-granularity full"),
])
def test_impossible_flags_are_refused(flags, message):
    with pytest.raises(RecomputeError, match=message):
        check_recompute(*flags)


def test_flags_parse_and_count_is_bounded_by_the_stage():
    base = ["--data-path", "x", "--seq-length", "16", "--train-iters", "1", "--hidden-size", "64",
            "--num-layers", "4"]
    args = parse_args(base + ["--recompute-granularity", "full", "--recompute-method", "block",
                              "--recompute-num-layers", "2"], world_size=1)
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == (
        "full", "block", 2)
    with pytest.raises(RecomputeError):
        parse_args(base + ["--recompute-granularity", "full"], world_size=1)
    with pytest.raises(ArgumentError, match="invalid choice: 'some'"):  # one line, not argparse's exit
        parse_args(base + ["--recompute-granularity", "some"], world_size=1)
    with pytest.raises(RecomputeError, match="exceeds the 2 layers"):
        check_recompute("full", "uniform", 3, layers_per_chunk=2)
    assert issubclass(RecomputeError, ValueError) and not issubclass(RecomputeError, ArgumentError)
