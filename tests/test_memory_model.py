"""The memory model's activation bytes against the bytes a tiny model's forward keeps for its
backward (counted with saved-tensor hooks), for every recompute mode and several layouts (10%)."""
import pytest
import torch

from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.parallel.memory_model import activation_bytes
from megatron_rwkvx.testing.distributed import run_distributed

from conftest import TINY

# A tiny model at the ratios of the real ones (F = 4C, heads of 64) so every term shows.
CFG = dict(TINY, hidden_size=128, head_size=64, ffn_hidden_size=512, vocab_size=256,
           layer_pattern="RRAR", sparse_chunk_size=64, sparse_top_k=2)
SEQ = 512
MODES = {
    "none": (None, None, None),
    "selective": ("selective", None, None),
    "full-uniform-2": ("full", "uniform", 2),
    "full-block-1": ("full", "block", 1),
}


def _measured(rank, world, layout, mode):
    from megatron_rwkvx.models.rwkvx_model import RWKVXModel
    from megatron_rwkvx.testing.distributed import initialize_parallel
    from megatron_rwkvx.testing.saved_activations import SavedActivationCounter
    from megatron_rwkvx.training.loop import _cp_slice

    tp, cp = layout.get("tp", 1), layout.get("cp", 1)
    initialize_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    g, m, n = MODES[mode]
    cfg = RWKVXConfig(tensor_model_parallel_size=tp, context_parallel_size=cp,
                      sequence_parallel=layout.get("sp", False), params_dtype=torch.bfloat16,
                      use_cpu_initialization=True, wkv_backend="chunked",
                      sparse_attention_backend="torch", recompute_granularity=g,
                      recompute_method=m, recompute_num_layers=n, **CFG)
    model = RWKVXModel(cfg)
    tokens = torch.randint(0, CFG["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(0))
    counter = SavedActivationCounter(model.parameters())
    with counter:
        loss = model(_cp_slice(tokens), labels=_cp_slice(tokens))
    loss.float().sum().backward()
    return counter.bytes


LAYOUTS = {"single": ({}, 1), "tp2-sp": ({"tp": 2, "sp": True}, 2), "cp2": ({"cp": 2}, 2)}


@pytest.mark.distributed
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("mode", list(MODES))
def test_model_within_ten_percent_of_the_measured_bytes(layout_name, mode):
    layout, world = LAYOUTS[layout_name]
    measured = max(run_distributed(_measured, world, layout, mode))
    cfg = RWKVXConfig(**CFG)
    parts = activation_bytes(cfg, SEQ, 1, tp=layout.get("tp", 1), cp=layout.get("cp", 1),
                             sequence_parallel=layout.get("sp", False), recompute=MODES[mode],
                             backend="torch")
    # The counter sees what is kept after the forward; the rebuilt unit is a backward-time peak.
    predicted = parts["total"] - parts["recompute_peak"]
    assert abs(predicted - measured) <= 0.1 * measured, (predicted, measured, parts)


def test_recompute_shrinks_the_blocks_as_measured():
    cfg = RWKVXConfig(hidden_size=768, layer_pattern="RRRA" * 4)
    none, sel, full = (activation_bytes(cfg, 65536, recompute=r)["blocks"]
                       for r in (MODES["none"], MODES["selective"], ("full", "uniform", 1)))
    assert none > 2.5 * sel > 2.5 * 4 * full
