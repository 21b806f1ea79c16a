"""Model configuration from arguments, model chunks per pipeline stage, stage-1 freezing, megatron
DDP, the (distributed) optimizer and the learning-rate schedule."""
from __future__ import annotations

import os
from typing import List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

from megatron_rwkvx.checkpointing.megatron_format import TRAINING_CHOICES, read_model_config
from megatron_rwkvx.checkpointing.official_format import load_state_dict_file
from megatron_rwkvx.config import ATTENTION_SYMBOL, MEAN_SELECTION, RWKV_SYMBOL, RWKVXConfig
from megatron_rwkvx.models.recompute import check_recompute
from megatron_rwkvx.models.rwkvx_model import RWKVXModel
from megatron_rwkvx.pretrained import config_from_file_state_dict, read_file_config
from megatron_rwkvx.training.arguments import ArgumentError

_SHAPE_ARGS = {
    "hidden_size": "--hidden-size",
    "head_size": "--head-size",
    "layer_pattern": "--layer-pattern",
    "ffn_hidden_size": "--ffn-hidden-size",
    "vocab_size": "--vocab-size",
    "attention_mode": "--attention-mode",
    "sparse_token_shift": "--sparse-token-shift",
}


def saved_model_fields(path: str) -> dict:
    """Architecture fields of an --init-from source (official .pth or megatron directory), the
    training choices (``TRAINING_CHOICES``) included."""
    if os.path.isdir(path):
        return read_model_config(path)
    # <file>.pth.json (written by export_checkpoint) keeps the pattern and GQA heads.
    shape, _ = config_from_file_state_dict(load_state_dict_file(path), read_file_config(path))
    return shape


def shape_fields(saved: dict) -> dict:
    """Saved fields less the training choices (how the sparse blocks select: stage 2 may change them)."""
    return {k: v for k, v in saved.items() if k not in TRAINING_CHOICES}


def model_shape_from_init(path: str) -> dict:
    """The model's shape from an --init-from source."""
    return shape_fields(saved_model_fields(path))


def _checkpoint_shape_source(args) -> Optional[str]:
    """Where --use-checkpoint-args reads the shape: the save being resumed, else --init-from."""
    if args.load:
        from megatron_rwkvx.checkpointing.megatron_format import read_latest_iteration

        if os.path.isdir(args.load) and read_latest_iteration(args.load) is not None:
            return args.load
    return args.init_from


def padded_vocab_size(vocab_size: int, args) -> int:
    """Megatron-LM's padding: up to a multiple of --make-vocab-size-divisible-by x TP."""
    if not args.make_vocab_size_divisible_by:
        return vocab_size
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def build_config(args, tokenizer_vocab_size: Optional[int]) -> RWKVXConfig:
    source = _checkpoint_shape_source(args) if args.use_checkpoint_args else args.init_from
    saved = saved_model_fields(source) if source else {}
    shape = shape_fields(saved)
    given = {
        "hidden_size": args.hidden_size,
        "head_size": args.head_size,
        "layer_pattern": args.layer_pattern or ("R" * args.num_layers if args.num_layers else None),
        "ffn_hidden_size": args.ffn_hidden_size,
        # For the NullTokenizer --vocab-size is the tokenizer's (Megatron-LM): the rows follow from it.
        "vocab_size": args.vocab_size if args.tokenizer_type != "NullTokenizer" else None,
        # Not given: the start checkpoint's, else the config's default (sparse).
        "attention_mode": args.attention_mode,
        "sparse_token_shift": args.sparse_token_shift,
    }
    for field, value in given.items():
        if value is None or (args.use_checkpoint_args and field in shape):
            continue  # --use-checkpoint-args: the checkpoint's shape wins, as in Megatron-LM
        if field in shape and shape[field] != value:
            raise ArgumentError(
                f"{_SHAPE_ARGS[field]} {value} disagrees with --init-from {args.init_from} "
                f"({field} = {shape[field]}); drop the argument, use a matching checkpoint, or "
                "add --use-checkpoint-args to take the checkpoint's"
            )
        shape[field] = value
    shape.setdefault("head_size", 64)
    if shape.get("vocab_size") is None:
        if tokenizer_vocab_size is None:
            raise ArgumentError("--vocab-size is required when the tokenizer does not tell it")
        shape["vocab_size"] = padded_vocab_size(tokenizer_vocab_size, args)
    if tokenizer_vocab_size is not None and tokenizer_vocab_size > shape["vocab_size"]:
        raise ArgumentError(
            f"the tokenizer has {tokenizer_vocab_size} tokens but the model's vocabulary has "
            f"{shape['vocab_size']} rows: the model cannot embed every token; use a matching "
            "tokenizer or a model with a larger --vocab-size"
        )
    if args.num_query_groups is None:
        shape.pop("num_query_groups", None)
    dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else torch.float32)
    cfg = RWKVXConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
        params_dtype=dtype,
        bf16=args.bf16,
        fp16=args.fp16,
        pipeline_dtype=dtype,
        use_cpu_initialization=args.device == "cpu",
        calculate_per_token_loss=True,
        # gloo matches concurrent sends between the same two ranks by order only; batched p2p
        # then mixes up activations and gradients when pp=2 with virtual stages (prev == next).
        batch_p2p_comm=args.device != "cpu",
        sparse_chunk_size=args.sparse_chunk_size,
        sparse_top_k=args.sparse_top_k,
        # Not given: the start checkpoint's (a .pth without its config file: the reference's mean).
        sparse_selection=args.sparse_selection or saved.get("sparse_selection", MEAN_SELECTION),
        wkv_backend=args.wkv_backend,
        sparse_attention_backend=args.sparse_attention_backend,
        l2wrap_factor=1e-4 if args.l2wrap else 0.0,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        **({"num_query_groups": args.num_query_groups} if args.num_query_groups else {}),
        **{k: v for k, v in shape.items() if not k.startswith("_")},
    )
    pattern = cfg.layer_pattern
    if args.train_only == "sparse" and ATTENTION_SYMBOL not in pattern:
        raise ArgumentError(
            "--train-only sparse trains the sparse-attention blocks, but the pattern "
            f"{pattern!r} has none; expand the model first (tools/convert_rwkv7_to_rwkvx.py)"
        )
    if args.rwkv_fade_in is not None and not (ATTENTION_SYMBOL in pattern and RWKV_SYMBOL in pattern):
        raise ArgumentError(
            f"--rwkv-fade-in silences the RWKV-7 blocks while the sparse-attention blocks learn, but "
            f"the pattern {pattern!r} lacks one of the two; expand the model first "
            "(tools/convert_rwkv7_to_rwkvx.py) or drop --rwkv-fade-in"
        )
    local = args.seq_length // args.context_parallel_size
    if args.context_parallel_size > 1 and ATTENTION_SYMBOL in pattern and local % cfg.sparse_chunk_size:
        raise ArgumentError(
            f"with context parallelism each rank's sequence ({args.seq_length} / "
            f"{args.context_parallel_size} = {local}) must be a multiple of --sparse-chunk-size "
            f"{cfg.sparse_chunk_size} so shard boundaries fall on chunk boundaries"
        )
    pp = args.pipeline_model_parallel_size
    vpp = args.virtual_pipeline_model_parallel_size or 1
    if cfg.num_layers % (pp * vpp):
        raise ArgumentError(
            f"{cfg.num_layers} layers cannot be split evenly over {pp} pipeline stages x {vpp} "
            "virtual stages; change the layout"
        )
    check_recompute(args.recompute_granularity, args.recompute_method, args.recompute_num_layers,
                    cfg.num_layers // (pp * vpp))
    return cfg


def build_model_chunks(cfg: RWKVXConfig, args) -> List[torch.nn.Module]:
    vpp = args.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        model = RWKVXModel(cfg, pre_process=pre, post_process=post, vp_stage=stage)
        if args.device == "cuda":
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def freeze_for_stage1(chunks: List[torch.nn.Module]) -> int:
    """Stage 1: only sparse-attention blocks train; returns the number of trainable parameters."""
    trainable = 0
    for model in chunks:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.decoder.layers:
            if layer.symbol == ATTENTION_SYMBOL:
                for p in layer.parameters():
                    p.requires_grad_(True)
                    trainable += p.numel()
    return trainable


def wrap_ddp(chunks, cfg, args) -> List[DistributedDataParallel]:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # non-finite steps are skipped and counted by the loop
        bucket_size=None if args.device == "cpu" else 40_000_000,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(
                config=cfg,
                ddp_config=ddp_config,
                module=chunk,
                # Only the first chunk's buckets may be overlapped with the previous step.
                disable_bucketing=(i > 0),
            )
        )
    return wrapped


def _decays(param: torch.Tensor, name: str) -> bool:
    """The reference RWKV-7 rule: weight decay on ``.weight`` matrices only; LoRA matrices, per-head
    tensors, norms and vectors are not decayed."""
    if param.dim() < 2 or not name.endswith(".weight"):
        return False
    lora_up = any(name.endswith(f"mixer.{k}2.weight") for k in "wavg")
    return not lora_up


def build_optimizer(ddp_chunks, cfg, args):
    opt_config = OptimizerConfig(
        optimizer=getattr(args, "optimizer", "adam"),
        sgd_momentum=getattr(args, "sgd_momentum", 0.9),
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        fp16=args.fp16,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis,
        params_dtype=cfg.params_dtype,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    no_decay = ParamKey(
        with_name_predicate=ParamWithNamePredicate(
            name="rwkv_no_weight_decay", fn=lambda p, n: not _decays(p, n)
        )
    )
    optimizer = get_megatron_optimizer(
        opt_config, ddp_chunks, config_overrides={no_decay: {"wd_mult": 0.0}}
    )
    return optimizer
