import pytest

from megatron_rwkvx.config import ConfigError, RWKVXConfig, default_pattern, official_lora_dim


def test_official_lora_widths():
    # docs/design.md: 0.1B (C=768): 64/64/32/128; 2.9B (C=2560): 96/96/64/320.
    assert [official_lora_dim(k, 768) for k in ("decay", "a", "v", "gate")] == [64, 64, 32, 128]
    assert [official_lora_dim(k, 2560) for k in ("decay", "a", "v", "gate")] == [96, 96, 64, 320]
    cfg = RWKVXConfig(hidden_size=768, num_layers=12)
    assert (cfg.decay_lora_dim, cfg.a_lora_dim, cfg.v_lora_dim, cfg.gate_lora_dim) == (64, 64, 32, 128)
    assert cfg.num_attention_heads == 12 and cfg.ffn_hidden_size == 3072


def test_pattern_drives_layers():
    cfg = RWKVXConfig(hidden_size=128, layer_pattern="rrra" * 2)
    assert cfg.layer_pattern == "RRRARRRA"
    assert cfg.num_layers == 8 and cfg.num_rwkv_layers == 6 and cfg.num_sparse_layers == 2
    assert cfg.rwkv_index(4) == 3 and cfg.sparse_index(7) == 1
    assert default_pattern(12, 4) == "RRRA" * 4
    assert default_pattern(32, 8) == "RRRRA" * 8


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(hidden_size=100, num_layers=2), ["hidden_size", "head_size"]),
        (dict(hidden_size=192, num_layers=2, tensor_model_parallel_size=2), ["heads", "tensor_model_parallel_size"]),
        (dict(hidden_size=128, layer_pattern="RRX"), ["unknown symbol", "X"]),
        (dict(hidden_size=128), ["layer_pattern", "num_layers"]),
        (dict(hidden_size=128, num_layers=3, layer_pattern="RR"), ["num_layers", "layer_pattern"]),
        (dict(hidden_size=128, num_layers=2, num_attention_heads=3), ["num_attention_heads"]),
        (dict(hidden_size=128, num_layers=2, sparse_top_k=0), ["sparse_top_k"]),
        (dict(hidden_size=128, num_layers=2, vocab_size=65529, tensor_model_parallel_size=2), ["vocab_size"]),
        (dict(hidden_size=256, num_layers=2, num_query_groups=3), ["num_query_groups"]),
        (dict(hidden_size=128, num_layers=2, decay_lora_dim=-1), ["decay_lora_dim"]),
    ],
)
def test_bad_configs_name_the_field(kwargs, words):
    with pytest.raises(ConfigError) as err:
        RWKVXConfig(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_uneven_reference_interleave_is_refused():
    with pytest.raises(ConfigError, match="multiple"):
        default_pattern(10, 4)
