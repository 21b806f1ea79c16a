"""--rwkv-fade-in: the RWKV-7 blocks' change to the stream gated from 0 up to 1 (finding 18)."""
import pytest
import torch

from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.models.rwkvx_model import RWKVXModel
from megatron_rwkvx.pretrained import prepare_runtime
from megatron_rwkvx.training import model_builder
from megatron_rwkvx.training.arguments import ArgumentError, parse_args
from megatron_rwkvx.training.rwkv_fade_in import gate_at, set_rwkv_gate

from conftest import TINY

BASE = ["--hidden-size", "64", "--seq-length", "64", "--train-iters", "10", "--data-path", "x",
        "--device", "cpu"]


def test_gate_is_zero_then_a_linear_ramp_then_one():
    assert [gate_at(i, (2, 6)) for i in range(1, 9)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [gate_at(i, (3, 3)) for i in (2, 3, 4)] == [0.0, 0.0, 1.0]  # a step
    assert gate_at(1, None) == 1.0


def _model(seed):
    torch.manual_seed(seed)
    model = RWKVXModel(RWKVXConfig(layer_pattern="RARR", use_cpu_initialization=True, **TINY),
                       parallel_output=False).eval()
    with torch.no_grad():  # zero-init outputs would make every block the identity
        for layer in model.decoder.layers:
            for weight in layer.parameters():
                weight.add_(torch.randn_like(weight) * 0.05)
    return model


def test_silenced_rwkv_blocks_leave_no_trace_and_a_partial_gate_scales_their_change():
    prepare_runtime(torch.device("cpu"))
    first, other = _model(0), _model(1)
    # the same embedding, attention blocks and head; other RWKV-7 blocks
    shared = {k: v for k, v in first.state_dict().items()
              if not k.startswith("decoder.layers.") or k.split(".")[2] == "1"}
    other.load_state_dict(shared, strict=False)
    ids = torch.randint(0, TINY["vocab_size"], (2, 32))
    with torch.no_grad():
        assert not torch.allclose(first(ids), other(ids))
        set_rwkv_gate([first, other], 0.0)
        assert torch.equal(first(ids), other(ids))
    set_rwkv_gate([first], 1.0)
    seen = {}
    layer = first.decoder.layers[2]  # an RWKV-7 block that reads the first block's v_first
    layer.register_forward_hook(lambda mod, args, out: seen.update(args=args))
    with torch.no_grad():
        first(ids)
        full, _ = layer(*seen["args"])
        layer.residual_gate = 0.25
        quarter, _ = layer(*seen["args"])
    x = seen["args"][0]
    assert not torch.allclose(full, x)
    torch.testing.assert_close(quarter, x + 0.25 * (full - x))


@pytest.mark.parametrize("window, words", [
    (["3", "11"], ["--rwkv-fade-in 3 11", "10 iterations"]),
    (["5", "4"], ["0 <= START <= END"]),
    (["-1", "4"], ["0 <= START <= END"]),
])
def test_a_fade_in_that_would_not_end_within_the_run_is_refused(window, words):
    with pytest.raises(ArgumentError) as err:
        parse_args(BASE + ["--layer-pattern", "RA", "--rwkv-fade-in", *window], world_size=1)
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("pattern", ["RR", "AA"])
def test_a_fade_in_needs_both_kinds_of_block(pattern):
    args = parse_args(BASE + ["--layer-pattern", pattern, "--rwkv-fade-in", "2", "4"], world_size=1)
    with pytest.raises(ArgumentError, match=f"the pattern '{pattern}' lacks one of the two"):
        model_builder.build_config(args, 256)
