"""One optimizer step of a tiny model under a given parallel layout, for equivalence tests.

Every layout must give the single-process loss and the single-process parameters after the step;
the body runs in spawned gloo processes (see ``megatron_rwkvx.testing.distributed``).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, Optional

import torch


def one_training_step(
    rank: int,
    world: int,
    layout: Dict,
    cfg_kwargs: Dict,
    checkpoint_path: str,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    micro_batch_size: int,
    lr: float = 1e-2,
    train_args: Optional[Dict] = None,
):
    """Returns (loss, full parameters after one step) on rank 0, None elsewhere.

    ``tokens``/``labels`` hold the whole global batch [G, S]; each data-parallel rank takes its
    contiguous share, split into micro-batches of ``micro_batch_size``. ``train_args`` overrides
    the training arguments the forward step reads (e.g. ``loss="longce"`` and its window).
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        get_num_microbatches,
        init_num_microbatches_calculator,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rwkvx.checkpointing.official_format import (
        export_state_dict,
        import_state_dict,
        load_state_dict_file,
    )
    from megatron_rwkvx.config import RWKVXConfig
    from megatron_rwkvx.models.stage_payload import StagePayload
    from megatron_rwkvx.testing.distributed import initialize_parallel
    from megatron_rwkvx.training import model_builder
    from megatron_rwkvx.training.loop import forward_step, reduce_reports

    tp = layout.get("tp", 1)
    pp = layout.get("pp", 1)
    cp = layout.get("cp", 1)
    vpp = layout.get("vpp")
    initialize_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                        context_parallel_size=cp, virtual_pipeline_model_parallel_size=vpp)
    dp = parallel_state.get_data_parallel_world_size()
    args = SimpleNamespace(
        device="cpu", loss="ce", virtual_pipeline_model_parallel_size=vpp,
        overlap_grad_reduce=False, use_distributed_optimizer=layout.get("dist_opt", False),
        # SGD: the step is lr x gradient, so equal parameters mean equal gradients. (Adam's first
        # step divides by |g| and turns rounding noise of near-zero gradients into +-lr jumps.)
        # The distributed optimizer only takes Adam: eps = 1 makes its first step ~ lr x g too.
        optimizer=layout.get("optimizer", "sgd"), sgd_momentum=0.0,
        lr=lr, min_lr=0.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.99, adam_eps=1.0,
        clip_grad=0.0, bf16=False, fp16=False, overlap_param_gather=False, loss_scale=None,
        initial_loss_scale=2.0 ** 32, min_loss_scale=1.0, loss_scale_window=1000, hysteresis=2,
    )
    vars(args).update(train_args or {})
    cfg = RWKVXConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        virtual_pipeline_model_parallel_size=vpp, sequence_parallel=layout.get("sp", False),
        use_cpu_initialization=True, calculate_per_token_loss=True,
        pipeline_dtype=torch.float32, batch_p2p_comm=False,  # see model_builder.build_config
        **cfg_kwargs,
    )
    chunks = model_builder.build_model_chunks(cfg, args)
    sd = load_state_dict_file(checkpoint_path)
    for chunk in chunks:
        import_state_dict(chunk, sd, cfg)
    ddp = model_builder.wrap_ddp(chunks, cfg, args)
    optimizer = model_builder.build_optimizer(ddp, cfg, args)
    cfg.grad_scale_func = optimizer.scale_loss
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = ddp[0].no_sync if len(ddp) == 1 else [m.no_sync for m in ddp]

    global_batch = tokens.shape[0]
    init_num_microbatches_calculator(rank, None, global_batch, micro_batch_size, dp)
    dp_rank = parallel_state.get_data_parallel_rank()
    share = global_batch // dp
    my_tokens = tokens[dp_rank * share : (dp_rank + 1) * share]
    my_labels = labels[dp_rank * share : (dp_rank + 1) * share]

    def batches():
        for i in range(0, share, micro_batch_size):
            yield {
                "tokens": my_tokens[i : i + micro_batch_size],
                "labels": my_labels[i : i + micro_batch_size],
                "loss_mask": torch.ones_like(my_labels[i : i + micro_batch_size], dtype=torch.float),
            }

    iters = [batches() for _ in ddp]
    for m in ddp:
        m.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=lambda it, model: forward_step(args, torch.device("cpu"), it, model),
        data_iterator=iters if len(iters) > 1 else iters[0],
        model=ddp,
        num_microbatches=get_num_microbatches(),
        seq_length=StagePayload.schedule_seq_length(cfg, tokens.shape[1]),
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    totals = reduce_reports(reports)
    optimizer.step()
    destroy_num_microbatches_calculator()

    # Gather parameters (each chunk's layers live on its own; export handles TP and PP).
    full = {}
    for chunk in chunks:
        full.update(export_state_dict(chunk, cfg, fill_unused=False))
    loss = None
    if totals is not None:
        loss = (totals[0] / totals[1]).item()
    # The last pipeline stage knows the loss; send it to rank 0.
    box = [loss]
    objs = [None] * world
    torch.distributed.all_gather_object(objs, box)
    losses = [o[0] for o in objs if o[0] is not None]
    if rank != 0:
        return None
    return losses[0], full
