"""Tensor parallel size 2 (with and without sequence parallelism) equals size 1."""
import pytest
import torch

from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.testing.checkpoints import random_official_state_dict
from megatron_rwkvx.testing.distributed import initialize_parallel, run_distributed

from conftest import TINY


def _forward_backward(rank, world, tp, sp, path, cfg_kwargs, tokens, labels):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_rwkvx.checkpointing.official_format import (
        export_state_dict,
        import_state_dict,
        load_state_dict_file,
    )
    from megatron_rwkvx.models.rwkvx_model import RWKVXModel

    initialize_parallel(tensor_model_parallel_size=tp)
    cfg = RWKVXConfig(
        tensor_model_parallel_size=tp, sequence_parallel=sp, use_cpu_initialization=True, **cfg_kwargs
    )
    model = RWKVXModel(cfg, parallel_output=False)
    import_state_dict(model, load_state_dict_file(path), cfg)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(), model)
    with torch.no_grad():
        logits = ddp(tokens)
    ddp.zero_grad_buffer()
    loss = ddp(tokens, labels=labels)
    loss.sum().backward()
    finalize_model_grads([ddp])
    grads = {name: p.main_grad for name, p in model.named_parameters()}
    full_grads = export_state_dict(model, cfg, tensors=grads, fill_unused=False)
    if rank != 0:
        return None
    return logits, loss.detach(), full_grads


@pytest.mark.distributed
@pytest.mark.parametrize(
    "sp, pattern",
    [(False, "RRR"), (True, "RRR"), (False, "RRARA"), (True, "RRARA")],
    ids=["rwkv7-tp2", "rwkv7-tp2-sp", "hybrid-tp2", "hybrid-tp2-sp"],
)
def test_tp2_equals_tp1(tmp_path, sp, pattern):
    # Chunk 4 with top-2 at T=16: the sparse selection really drops chunks.
    cfg_kwargs = dict(TINY, layer_pattern=pattern, sparse_chunk_size=4, sparse_top_k=2)
    cfg = RWKVXConfig(**cfg_kwargs)
    path = str(tmp_path / "rand.pth")
    torch.save(random_official_state_dict(cfg, seed=11), path)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    (ref,) = run_distributed(_forward_backward, 1, 1, False, path, cfg_kwargs, tokens, labels)
    par = run_distributed(_forward_backward, 2, 2, sp, path, cfg_kwargs, tokens, labels)[0]
    for name, a, b in (("logits", par[0], ref[0]), ("loss", par[1], ref[1])):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-5, f"{name}: relative error {err:.2e}"
    assert par[2].keys() == ref[2].keys()
    for key in ref[2]:
        a, b = par[2][key], ref[2][key]
        # Norm-wise relative error. Gradients sum partial products in another order under TP (the
        # row-parallel all-reduce, the sharded vocabulary); through five fp32 layers that rounding
        # reaches ~1e-5 on small cancelling gradients such as the token-shift mixes.
        err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
        assert err < 5e-5, f"gradient of {key}: relative error {err:.2e}"
