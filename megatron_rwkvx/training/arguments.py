"""Command-line arguments of ``python -m megatron_rwkvx.pretrain`` (Megatron-LM names), validated
up front so that an impossible run fails before any work is done."""
from __future__ import annotations

import argparse
import math
import os
from typing import List, Optional

from megatron_rwkvx.errors import UsageError


class ArgumentError(UsageError):
    """An impossible or inconsistent set of arguments."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_rwkvx.pretrain",
        description="Pretrain RWKV-7 / RWKV-X models on megatron-core (tensor, pipeline, context "
        "and data parallel; distributed optimizer; resumable sharded checkpoints).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument("--layer-pattern", default=None,
                   help="stack pattern: R = RWKV-7 block, A = sparse-attention block (e.g. RRRARRRA)")
    m.add_argument("--num-layers", type=int, default=None,
                   help="number of RWKV-7 blocks when no --layer-pattern is given")
    m.add_argument("--hidden-size", type=int, default=None, help="model width C")
    m.add_argument("--head-size", type=int, default=None, help="default 64")
    m.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden size")
    m.add_argument("--vocab-size", type=int, default=None,
                   help="embedding rows; default: the tokenizer's vocabulary size")
    m.add_argument("--num-query-groups", type=int, default=None,
                   help="key/value heads of the sparse attention (grouped-query attention)")
    m.add_argument("--sparse-chunk-size", type=int, default=2048)
    m.add_argument("--sparse-top-k", type=int, default=3)
    m.add_argument("--wkv-backend", default="auto", help="auto | triton | chunked | naive | fla")
    m.add_argument("--sparse-attention-backend", default="auto", help="auto | triton | torch | reference")
    m.add_argument("--init-from", default=None,
                   help="start weights: an official RWKV-7/RWKV-X .pth or a megatron checkpoint "
                        "directory (model shape is read from it); ignored when --load resumes")

    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    par.add_argument("--context-parallel-size", type=int, default=1)
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--use-distributed-optimizer", action="store_true")
    par.add_argument("--overlap-grad-reduce", action="store_true")

    d = p.add_argument_group("data")
    d.add_argument("--data-path", nargs="+", default=None,
                   help="dataset prefixes, optionally weighted: '0.7 pathA 0.3 pathB'")
    d.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    d.add_argument("--data-cache-path", default=None)
    d.add_argument("--tokenizer-type", default="RWKVWorldTokenizer",
                   choices=["RWKVWorldTokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer"])
    d.add_argument("--tokenizer-model", default=None)
    d.add_argument("--seq-length", type=int, required=False, default=None)
    d.add_argument("--micro-batch-size", type=int, default=1)
    d.add_argument("--global-batch-size", type=int, default=None)

    t = p.add_argument_group("training")
    t.add_argument("--train-iters", type=int, default=None)
    t.add_argument("--train-tokens", type=int, default=None)
    t.add_argument("--lr", type=float, default=1e-5)
    t.add_argument("--min-lr", type=float, default=0.0)
    t.add_argument("--lr-decay-style", default="constant", choices=["constant", "linear", "cosine", "WSD"])
    t.add_argument("--lr-warmup-iters", type=int, default=0)
    t.add_argument("--lr-decay-iters", type=int, default=None,
                   help="default: --train-iters, so on a resume a longer --train-iters also "
                        "lengthens the decay (a change of schedule, see "
                        "--override-opt-param-scheduler); give it explicitly to keep the decay "
                        "fixed when extending a run")
    t.add_argument("--lr-wsd-decay-iters", type=int, default=None, help="decay phase length for WSD")
    t.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on a resume, use the learning-rate schedule of the command line (--lr, "
                        "--min-lr, --lr-warmup-iters, --lr-decay-iters, --lr-decay-style, "
                        "--lr-wsd-decay-iters, --weight-decay) instead of the checkpoint's; the "
                        "step count continues from the checkpoint")
    t.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                   help="on a resume, keep the checkpoint's learning-rate schedule and ignore the "
                        "command line's. With neither flag a resume whose schedule differs from "
                        "the checkpoint's is refused, naming the differences (values that do not "
                        "affect the schedule, like --lr-decay-iters with a constant lr, are not "
                        "compared: the command line's are kept)")
    t.add_argument("--weight-decay", type=float, default=0.001, help="applied to matrices only")
    t.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="adam is AdamW")
    t.add_argument("--sgd-momentum", type=float, default=0.9)
    t.add_argument("--adam-beta1", type=float, default=0.9)
    t.add_argument("--adam-beta2", type=float, default=0.99)
    t.add_argument("--adam-eps", type=float, default=1e-18)
    t.add_argument("--clip-grad", type=float, default=1.0)
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--train-only", choices=["all", "sparse"], default="all",
                   help="sparse: stage 1, only the sparse-attention blocks train")
    t.add_argument("--loss", choices=["ce", "longce"], default="ce")
    t.add_argument("--longce-window", type=int, default=8000, help="short-context window (tokens)")
    t.add_argument("--longce-stride", type=int, default=4000, help="stride between short windows")
    t.add_argument("--longce-tau", type=float, default=10.0, help="cap of the LongCE token weight")
    t.add_argument("--l2wrap", action="store_true", help="RWKV's L2Wrap logit regulariser")
    t.add_argument("--max-skipped-iters", type=int, default=10,
                   help="stop after this many steps skipped for non-finite loss/gradients")

    e = p.add_argument_group("evaluation, checkpoints and logging")
    e.add_argument("--eval-interval", type=int, default=1000)
    e.add_argument("--eval-iters", type=int, default=10)
    e.add_argument("--skip-train", action="store_true",
                   help="load (--load or --init-from), run one validation, exit")
    e.add_argument("--save", default=None)
    e.add_argument("--load", default=None, help="resume from this checkpoint directory if it has one")
    e.add_argument("--save-interval", type=int, default=None)
    e.add_argument("--keep-last-checkpoints", type=int, default=3)
    e.add_argument("--no-load-optim", action="store_true")
    e.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="with --use-distributed-optimizer: save the optimizer state so that it loads "
                        "at any TP/PP/DP layout (slower saves); default: DP-reshardable, which "
                        "loads only at the same TP/PP layout")
    e.add_argument("--no-load-rng", action="store_true")
    e.add_argument("--log-interval", type=int, default=10)
    e.add_argument("--tensorboard-dir", default=None)
    e.add_argument("--exit-duration-in-mins", type=float, default=None)
    e.add_argument("--exit-interval", type=int, default=None, help="stop (with a save) at this iteration")
    e.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu (gloo + the CPU runtime shim)")
    e.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for the MFU estimate (default: 989 on H100/H200 bf16)")
    return p


def parse_args(argv: Optional[List[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    validate_args(args, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
    return args


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Checks that need no model or data; model/data checks follow once those are known."""
    def fail(msg):
        raise ArgumentError(msg)

    tp, pp, cp = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                  args.context_parallel_size)
    for name, v in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                    ("--context-parallel-size", cp)):
        if v < 1:
            fail(f"{name} must be >= 1, got {v}")
    if world_size % (tp * pp * cp) != 0:
        fail(f"world size {world_size} is not divisible by tensor x pipeline x context parallel "
             f"= {tp} x {pp} x {cp} = {tp * pp * cp}; change the layout or the number of processes")
    args.data_parallel_size = world_size // (tp * pp * cp)
    args.world_size = world_size

    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.seq_length is None or args.seq_length <= 0:
        fail("--seq-length is required (tokens per sample)")
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # nothing to shard; megatron-LM does the same
    local = args.seq_length // cp
    if args.seq_length % cp:
        fail(f"--seq-length {args.seq_length} is not divisible by --context-parallel-size {cp}")
    if args.sequence_parallel and local % tp:
        fail(f"with --sequence-parallel the per-rank sequence {local} must be divisible by "
             f"--tensor-model-parallel-size {tp}")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % (args.micro_batch_size * args.data_parallel_size):
        fail(f"--global-batch-size {args.global_batch_size} must be a multiple of micro batch "
             f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size}")
    if (args.train_iters is None) == (args.train_tokens is None):
        fail("give exactly one of --train-iters and --train-tokens")
    if args.train_tokens is not None:
        per_iter = args.global_batch_size * args.seq_length
        args.train_iters = max(1, math.ceil(args.train_tokens / per_iter))
    if args.train_iters <= 0:
        fail(f"--train-iters must be positive, got {args.train_iters}")
    if args.skip_train and args.eval_iters <= 0:
        fail("--skip-train evaluates only: give --eval-iters > 0")
    from megatron_rwkvx.data.datasets import DataConfigError, parse_split

    try:
        train_share, valid_share, _ = parse_split(args.split)
    except DataConfigError as err:
        fail(str(err))
    if train_share <= 0:
        fail(f"--split {args.split!r} leaves the train split empty; give it a share")
    if valid_share <= 0 and args.eval_iters > 0:
        fail(f"--split {args.split!r} leaves the valid split empty; give it a share, or set "
             "--eval-iters 0 to train without validation")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        fail("--override-opt-param-scheduler (the command line's schedule) and "
             "--use-checkpoint-opt-param-scheduler (the checkpoint's) exclude each other; give one")
    # Remembered so that a schedule mismatch on resume can say where the decay length came from.
    args.lr_decay_iters_from_train_iters = args.lr_decay_iters is None
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_decay_style == "WSD" and not args.lr_wsd_decay_iters:
        fail("--lr-decay-style WSD needs --lr-wsd-decay-iters (length of the decay phase)")
    if args.lr_warmup_iters >= args.lr_decay_iters:
        fail(f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than --lr-decay-iters "
             f"{args.lr_decay_iters} (default: the training iterations)")
    if args.min_lr > args.lr:
        fail(f"--min-lr {args.min_lr} exceeds --lr {args.lr}")
    if args.save_interval is not None and args.save_interval <= 0:
        fail("--save-interval must be positive")
    if args.save_interval and not args.save:
        fail("--save-interval needs --save DIR")
    if args.data_path is None:
        fail("--data-path is required (see tools/preprocess_data.py to make one)")
    if args.layer_pattern is None and args.num_layers is None and args.init_from is None:
        fail("give the model shape (--layer-pattern or --num-layers, --hidden-size) or --init-from")
    if args.init_from is None and args.hidden_size is None:
        fail("--hidden-size is required unless --init-from gives the model shape")
    if args.virtual_pipeline_model_parallel_size is not None and pp == 1:
        fail("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size > 1")
    if args.dist_ckpt_optim_fully_reshardable:
        if not args.use_distributed_optimizer:
            fail("--dist-ckpt-optim-fully-reshardable applies to --use-distributed-optimizer only")
        from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

        if not HAVE_APEX_OR_TE:
            fail("--dist-ckpt-optim-fully-reshardable needs Transformer Engine or Apex: with "
                 "torch's Adam (their fallback) megatron-core 0.16.1 saves that format but fails "
                 "to load it ('step' missing); install one of them, or drop the flag (the default "
                 "format resumes at any data-parallel size with the same TP/PP)")
    if args.loss == "longce":
        if args.longce_stride <= 0 or args.longce_window <= args.longce_stride:
            fail("LongCE needs 0 < --longce-stride < --longce-window")
        if cp > 1 or pp > 1:
            fail("--loss longce runs its short-context forwards on whole sequences; it supports "
                 "tensor and data parallelism only (use --context-parallel-size 1 and "
                 "--pipeline-model-parallel-size 1)")
