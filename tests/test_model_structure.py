"""The model's seams: layer specs as an argument, the TimeMix's two entry points."""
import pytest
import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_rwkvx.config import ATTENTION_SYMBOL, RWKV_SYMBOL, RWKVXConfig
from megatron_rwkvx.layers import specs
from megatron_rwkvx.layers.rwkv7_time_mix import RWKV7TimeMix
from megatron_rwkvx.layers.sparse_attention_block import SparseAttentionMixer
from megatron_rwkvx.models.rwkvx_model import RWKVXModel
from megatron_rwkvx.pretrained import prepare_runtime

from conftest import TINY


class MarkedMixer(SparseAttentionMixer):
    """A mixer only a caller's spec can put into the stack."""


@pytest.fixture
def cfg():
    prepare_runtime(torch.device("cpu"))
    return RWKVXConfig(layer_pattern="RAR", use_cpu_initialization=True, **TINY)


def test_model_builds_the_layer_specs_it_is_given(cfg):
    default = RWKVXModel(cfg)
    assert [type(layer.mixer) for layer in default.decoder.layers] == [
        RWKV7TimeMix, SparseAttentionMixer, RWKV7TimeMix]
    given = specs.layer_specs()
    given[ATTENTION_SYMBOL] = specs.block_spec(
        ModuleSpec(module=MarkedMixer, submodules=given[ATTENTION_SYMBOL].submodules.mixer.submodules))
    model = RWKVXModel(cfg, layer_specs=given)
    assert [type(layer.mixer) for layer in model.decoder.layers] == [
        RWKV7TimeMix, MarkedMixer, RWKV7TimeMix]
    with pytest.raises(ValueError, match=r"no layer spec for pattern symbol\(s\) \['A'\]"):
        RWKVXModel(cfg, layer_specs={RWKV_SYMBOL: given[RWKV_SYMBOL]})


def test_time_mix_forward_is_forward_with_state_without_the_state(cfg):
    torch.manual_seed(0)
    mixer = RWKVXModel(cfg).decoder.layers[0].mixer
    with torch.no_grad():  # the initial output projection is zero: give every term a value
        for p in mixer.parameters():
            p.normal_(0.0, 0.2)
    x = torch.randn(6, 2, cfg.hidden_size)
    out = mixer(x, None)
    assert len(out) == 2
    (y, _), v_first = out
    assert y.abs().max() > 0.1
    step = mixer.forward_with_state(x, None)
    assert torch.equal(step.output[0], y) and torch.equal(step.v_first, v_first)
    assert torch.equal(step.last_token, x[-1])
    # The state carries the sequence on: two halves give the whole.
    first = mixer.forward_with_state(x[:3], None)
    second = mixer.forward_with_state(x[3:], None, previous_token=first.last_token,
                                      initial_state=first.wkv_state)
    assert torch.allclose(torch.cat([first.output[0], second.output[0]]), y, atol=1e-5)
    assert torch.allclose(second.wkv_state, step.wkv_state, atol=1e-5)
