"""Command-line arguments of ``python -m megatron_rwkvx.pretrain`` (Megatron-LM names), validated
up front so that an impossible run fails before any work is done."""
from __future__ import annotations

import argparse
import math
import os
from typing import List, Optional

from megatron_rwkvx.config import ATTENTION_MODES, SELECTION_RULES, attention_layout_error
from megatron_rwkvx.data.tokenizers import TOKENIZER_TYPES
from megatron_rwkvx.errors import UsageError
from megatron_rwkvx.models.recompute import GRANULARITIES, METHODS, check_recompute
from megatron_rwkvx.training import megatron_lm_flags


class ArgumentError(UsageError):
    """An impossible or inconsistent set of arguments."""


class _Parser(argparse.ArgumentParser):
    """argparse's own complaints (a bad value, a missing one) as one ``error:`` line, not a usage dump."""

    def error(self, message):
        raise ArgumentError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m megatron_rwkvx.pretrain",
        allow_abbrev=False,  # as Megatron-LM: a misspelt flag must not select another one
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
    m.add_argument("--sparse-selection", choices=SELECTION_RULES, default=None,
                   help="how a query scores the past chunks: mean = against the chunk's mean key (the "
                        "reference RWKV-X, MoBA); quest = the largest score one of the chunk's keys can "
                        "reach (Quest's bound from the keys' elementwise max and min; not in the "
                        "reference). Saved with the checkpoint; a stage may change it; default: the "
                        "--init-from checkpoint's, else mean")
    m.add_argument("--wkv-backend", default="auto",
                   help="auto (the fastest exact one on a GPU, torch on the CPU) | torch | triton | fla "
                        "| reference; old names: chunked = torch, naive = reference")
    m.add_argument("--sparse-attention-backend", default="auto",
                   help="auto (the fastest exact one on a GPU, torch on the CPU) | torch | triton | reference")
    m.add_argument("--attention-mode", choices=ATTENTION_MODES, default=None,
                   help="what the A blocks compute: sparse = top-k chunk attention (RWKV-X); dense = "
                        "dense causal attention through SDPA (flash on a GPU in bf16), the baseline "
                        "of the same size (no context parallelism). Saved with the checkpoint; "
                        "default: the --init-from checkpoint's, else sparse")
    m.add_argument("--sparse-token-shift", action=argparse.BooleanOptionalAction, default=None,
                   help="token shift on the sparse blocks' query/key/value inputs (x + mu (x[t-1] - x), "
                        "mu learned per channel); not in the reference RWKV-X (see "
                        "docs/retrieval_study.md, finding 13). Saved with the checkpoint; default: the "
                        "--init-from checkpoint's, else off")
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
    par.add_argument("--overlap-param-gather", action="store_true",
                     help="overlap the distributed optimizer's parameter all-gather with the next "
                          "forward (megatron-core's DDP pre-forward hooks)")

    # Activation recomputation: Megatron-LM's flags and meanings (megatron_rwkvx/models/recompute.py).
    rc = p.add_argument_group("activation recomputation")
    rc.add_argument("--recompute-granularity", choices=GRANULARITIES, default=None,
                    help="full: recompute whole layers (groups); selective: keep the projections, "
                         "recompute the rest of every layer (operators, LoRAs, ChannelMix hidden)")
    rc.add_argument("--recompute-method", choices=METHODS, default=None,
                    help="with full: uniform = groups of --recompute-num-layers layers; block = "
                         "the first --recompute-num-layers layers of each pipeline stage")
    rc.add_argument("--recompute-num-layers", type=int, default=None)

    d = p.add_argument_group("data")
    d.add_argument("--data-path", nargs="+", default=None,
                   help="dataset prefixes, optionally weighted: '0.7 pathA 0.3 pathB'")
    d.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    d.add_argument("--data-cache-path", default=None)
    d.add_argument("--num-workers", type=int, default=0,
                   help="processes reading training batches ahead (Megatron-LM's default is 2; "
                        "0 reads them in the training process)")
    d.add_argument("--loss-on-spans", action="store_true",
                   help="the loss only on the tokens that each --data-path dataset's loss mask marks (made by "
                        "tools/preprocess_data.py --loss-spans-key: the answers of an SFT or retrieval corpus); "
                        "the logged training and validation loss is then the loss on those tokens")
    d.add_argument("--mock-data", action="store_true",
                   help="random tokens from megatron-core's MockGPTDataset instead of --data-path "
                        "(smoke tests of a layout or a cluster)")
    d.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the embedding rows of a new model to a multiple of this x "
                        "--tensor-model-parallel-size (Megatron-LM pads to 128 by default; "
                        "RWKV-X keeps the tokenizer's size unless asked, as the reference "
                        "checkpoints)")
    d.add_argument("--tokenizer-type", default="RWKVWorldTokenizer", choices=TOKENIZER_TYPES)
    d.add_argument("--tokenizer-model", default=None)
    d.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2's vocab.json")
    d.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2's merges.txt")
    d.add_argument("--seq-length", type=int, required=False, default=None)
    d.add_argument("--micro-batch-size", type=int, default=1)
    d.add_argument("--global-batch-size", type=int, default=None)

    t = p.add_argument_group("training")
    t.add_argument("--train-iters", type=int, default=None)
    t.add_argument("--train-tokens", type=int, default=None)
    t.add_argument("--train-samples", type=int, default=None,
                   help="train for this many samples (Megatron-LM): --train-iters = samples // "
                        "--global-batch-size, and the learning-rate schedule counts samples")
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
    t.add_argument("--lr-warmup-samples", type=int, default=0, help="with --train-samples")
    t.add_argument("--lr-decay-samples", type=int, default=None,
                   help="with --train-samples; default: --train-samples")
    t.add_argument("--lr-wsd-decay-samples", type=int, default=None, help="with --train-samples")
    t.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warm up over this fraction of the decay length (instead of "
                        "--lr-warmup-iters / --lr-warmup-samples)")
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
    t.add_argument("--fp16", action="store_true",
                   help="fp16 parameters with megatron-core's dynamic loss scaling")
    t.add_argument("--loss-scale", type=float, default=None,
                   help="fp16: a static loss scale (default: dynamic)")
    t.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    t.add_argument("--min-loss-scale", type=float, default=1.0)
    t.add_argument("--loss-scale-window", type=float, default=1000)
    t.add_argument("--hysteresis", type=int, default=2)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--train-only", choices=["all", "sparse"], default="all",
                   help="sparse: stage 1, only the sparse-attention blocks train")
    t.add_argument("--rwkv-fade-in", type=int, nargs=2, metavar=("START", "END"), default=None,
                   help="not the reference recipe: the RWKV-7 blocks' change to the residual stream "
                        "is multiplied by 0 up to iteration START, rising linearly to 1 at END, so "
                        "that new sparse blocks first learn beside no RWKV-7 answer "
                        "(docs/retrieval_study.md, finding 18)")
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
    e.add_argument("--distributed-timeout-minutes", type=float, default=30,
                   help="how long a collective waits for a missing rank before the job fails")
    e.add_argument("--ckpt-format", default="torch_dist",
                   help="only torch_dist (megatron-core's dist_checkpointing) is written and read")
    e.add_argument("--finetune", action="store_true",
                   help="start from the weights in --load at iteration 0, without its optimizer, "
                        "scheduler, RNG or data position (Megatron-LM); a requeued job resumes "
                        "from its own --save")
    e.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model's shape from the checkpoint being resumed (--load) or "
                        "started from (--init-from) instead of the command line")
    e.add_argument("--wandb-project", default=None, help="log to Weights & Biases (needs wandb)")
    e.add_argument("--wandb-exp-name", default=None)
    e.add_argument("--wandb-save-dir", default=None, help="default: <--save>/wandb")
    e.add_argument("--wandb-entity", default=None)
    e.add_argument("--profile", action="store_true",
                   help="profile iterations --profile-step-start to --profile-step-end: with "
                        "--use-pytorch-profiler a torch.profiler trace in --tensorboard-dir, "
                        "else (GPU) cudaProfilerStart/Stop for nsys --capture-range=cudaProfilerApi")
    e.add_argument("--use-pytorch-profiler", action="store_true")
    e.add_argument("--profile-step-start", type=int, default=10)
    e.add_argument("--profile-step-end", type=int, default=12)
    e.add_argument("--profile-ranks", type=int, nargs="+", default=[0])
    e.add_argument("--manual-gc", action="store_true",
                   help="disable Python's automatic garbage collector; collect every "
                        "--manual-gc-interval iterations on all ranks at once (avoids stragglers)")
    e.add_argument("--manual-gc-interval", type=int, default=0, help="0: only at evaluation")
    e.add_argument("--no-manual-gc-eval", action="store_false", dest="manual_gc_eval",
                   help="with --manual-gc, do not collect at each evaluation")
    e.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for the MFU estimate (default: 989 on H100/H200 bf16)")
    _add_checkpoint_integrity_args(e)
    megatron_lm_flags.add_accepted_flags(p)
    return p


def _add_checkpoint_integrity_args(group) -> None:
    """Which saved iteration a resume loads, and what it does with a damaged one."""
    group.add_argument("--ckpt-step", type=int, default=None,
                       help="resume this saved iteration of --load instead of the one "
                            "latest_checkpointed_iteration.txt names (e.g. the intact iteration "
                            "before a damaged one)")
    group.add_argument("--auto-fallback", action="store_true",
                       help="when the iteration to resume is damaged or incomplete, resume the "
                            "newest intact earlier one with a warning instead of stopping "
                            "(unattended requeues)")


def _check_checkpoint_integrity_args(args, fail) -> None:
    if args.ckpt_step is not None:
        if not args.load:
            fail("--ckpt-step selects an iteration of --load DIR: give --load")
        if args.ckpt_step < 0:
            fail(f"--ckpt-step must be >= 0, got {args.ckpt_step}")


def parse_args(argv: Optional[List[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    problem = megatron_lm_flags.explain_unknown(unknown, list(parser._option_string_actions)) or \
        megatron_lm_flags.check_accepted_values(args)
    if problem:
        raise ArgumentError(problem)
    validate_args(args, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
    return args


def _resolve_schedule_lengths(args, fail) -> None:
    """``args.lr_schedule_*``: warm-up, decay and WSD lengths in the unit the scheduler counts.

    Iteration-based runs count iterations; sample-based runs (--train-samples) count samples, as
    Megatron-LM does, so a warm-up of 183105 samples with global batch 1536 ends mid-iteration
    exactly where Megatron-LM's would.
    """
    by_samples = args.train_samples is not None
    iter_flags = [f for f, v, default in (("--lr-warmup-iters", args.lr_warmup_iters, 0),
                                          ("--lr-decay-iters", args.lr_decay_iters, None),
                                          ("--lr-wsd-decay-iters", args.lr_wsd_decay_iters, None)) if v != default]
    sample_flags = [f for f, v, default in (("--lr-warmup-samples", args.lr_warmup_samples, 0),
                                            ("--lr-decay-samples", args.lr_decay_samples, None),
                                            ("--lr-wsd-decay-samples", args.lr_wsd_decay_samples, None))
                    if v != default]
    if by_samples and iter_flags:
        fail(f"{', '.join(iter_flags)} count iterations, but --train-samples makes the schedule count "
             "samples: give --lr-warmup-samples / --lr-decay-samples / --lr-wsd-decay-samples")
    if not by_samples and sample_flags:
        fail(f"{', '.join(sample_flags)} apply with --train-samples; with --train-iters or "
             "--train-tokens give --lr-warmup-iters / --lr-decay-iters / --lr-wsd-decay-iters")
    warmup_flag = "--lr-warmup-samples" if by_samples else "--lr-warmup-iters"
    decay_flag = "--lr-decay-samples" if by_samples else "--lr-decay-iters"
    wsd_flag = "--lr-wsd-decay-samples" if by_samples else "--lr-wsd-decay-iters"
    total = args.train_samples if by_samples else args.train_iters
    decay = args.lr_decay_samples if by_samples else args.lr_decay_iters
    warmup = args.lr_warmup_samples if by_samples else args.lr_warmup_iters
    wsd = args.lr_wsd_decay_samples if by_samples else args.lr_wsd_decay_iters
    # Remembered so that a schedule mismatch on resume can say where the decay length came from.
    args.lr_decay_iters_from_train_iters = decay is None
    if decay is None:
        decay = total
    if args.lr_warmup_fraction is not None:
        if warmup:
            fail(f"--lr-warmup-fraction and {warmup_flag} both set the warm-up: give one")
        if not 0 <= args.lr_warmup_fraction < 1:
            fail(f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
        warmup = int(args.lr_warmup_fraction * decay)
    if args.lr_decay_style == "WSD" and not wsd:
        fail(f"--lr-decay-style WSD needs {wsd_flag} (length of the decay phase)")
    if warmup >= decay:
        fail(f"{warmup_flag} {warmup} must be smaller than {decay_flag} {decay} (default: the "
             f"training {'samples' if by_samples else 'iterations'})")
    if not by_samples:
        args.lr_decay_iters = decay
    args.lr_schedule_unit = args.global_batch_size if by_samples else 1  # scheduler steps per iteration
    args.lr_schedule_warmup, args.lr_schedule_decay, args.lr_schedule_wsd = warmup, decay, wsd
    args.lr_schedule_total = total


_CKPT_FORMATS = ("torch", "torch_dist", "zarr", "torch_dcp", "fsdp_dtensor")


def _validate_megatron_lm_options(args, fail) -> None:
    """The Megatron-LM flags whose combinations can be checked before anything starts."""
    if args.ckpt_format != "torch_dist":
        known = args.ckpt_format in _CKPT_FORMATS
        fail(f"--ckpt-format {args.ckpt_format}: RWKV-X checkpoints are torch_dist (megatron-core's "
             "dist_checkpointing, resumable at other layouts) only"
             + ("; for a single-file model use tools/export_checkpoint.py" if known else
                f"; Megatron-LM's formats are {', '.join(_CKPT_FORMATS)}"))
    if args.fp16 and args.bf16:
        fail("--fp16 and --bf16 exclude each other: give one")
    if args.distributed_timeout_minutes <= 0:
        fail("--distributed-timeout-minutes must be > 0")
    if args.make_vocab_size_divisible_by is not None and args.make_vocab_size_divisible_by < 1:
        fail("--make-vocab-size-divisible-by must be >= 1")
    if args.finetune:
        if not args.load:
            fail("--finetune starts from the weights in --load: give --load DIR")
        if args.init_from:
            fail("--finetune --load DIR and --init-from both give the start weights: give one")
        if args.save and os.path.abspath(args.save) == os.path.abspath(args.load):
            fail("--finetune with --save equal to --load would resume the pretrained run (and "
                 "overwrite it) instead of fine-tuning: give another --save")
        # Megatron-LM's meaning (weights only, iteration 0) is --init-from's; a requeue of this job
        # then resumes from its own saves instead of starting over.
        args.init_from, args.load = args.load, args.save
    if args.use_checkpoint_args and not (args.load or args.init_from):
        fail("--use-checkpoint-args reads the model's shape from --load or --init-from: give one")
    if args.profile:
        if args.profile_step_end <= args.profile_step_start or args.profile_step_start < 0:
            fail("--profile needs 0 <= --profile-step-start < --profile-step-end")
        if not args.use_pytorch_profiler and args.device != "cuda":
            fail("--profile without --use-pytorch-profiler marks a window for nsys on a GPU; on "
                 "the CPU add --use-pytorch-profiler (writes a trace to --tensorboard-dir)")
        if args.use_pytorch_profiler and not args.tensorboard_dir:
            fail("--use-pytorch-profiler writes its trace to --tensorboard-dir: give one")
    if args.wandb_project:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            fail("--wandb-project logs through the wandb package, which is not installed: "
                 "pip install wandb (or pip install 'megatron-rwkvx[wandb]'), or drop the flag")
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        fail("--overlap-param-gather overlaps the distributed optimizer's parameter all-gather: it "
             "needs --use-distributed-optimizer and --overlap-grad-reduce (as Megatron-LM)")
    if args.num_workers < 0:
        fail("--num-workers must be >= 0")
    if args.manual_gc_interval < 0:
        fail("--manual-gc-interval must be >= 0")


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
    budgets = [f for f, v in (("--train-iters", args.train_iters), ("--train-tokens", args.train_tokens),
                              ("--train-samples", args.train_samples)) if v is not None]
    if len(budgets) != 1:
        fail("give exactly one of --train-iters, --train-tokens and --train-samples"
             + (f" (got {' and '.join(budgets)})" if budgets else ""))
    if args.train_tokens is not None:
        per_iter = args.global_batch_size * args.seq_length
        args.train_iters = max(1, math.ceil(args.train_tokens / per_iter))
    if args.train_samples is not None:
        # As Megatron-LM (without batch-size ramp-up): whole global batches only.
        args.train_iters = args.train_samples // args.global_batch_size
        if args.train_iters <= 0:
            fail(f"--train-samples {args.train_samples} is less than one global batch "
                 f"({args.global_batch_size} samples)")
    if args.train_iters <= 0:
        fail(f"--train-iters must be positive, got {args.train_iters}")
    if args.rwkv_fade_in is not None:
        start, end = args.rwkv_fade_in
        if not 0 <= start <= end <= args.train_iters:
            fail(f"--rwkv-fade-in {start} {end} must satisfy 0 <= START <= END <= the run's "
                 f"{args.train_iters} iterations, so that the model saved at the end is the full model")
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
    _resolve_schedule_lengths(args, fail)
    if not args.lr > 0:
        fail(f"--lr must be > 0, got {args.lr}")
    if args.min_lr < 0:
        fail(f"--min-lr must be >= 0, got {args.min_lr}")
    if args.min_lr > args.lr:
        fail(f"--min-lr {args.min_lr} exceeds --lr {args.lr}")
    _check_checkpoint_integrity_args(args, fail)
    if args.save_interval is not None and args.save_interval <= 0:
        fail("--save-interval must be positive")
    if args.save_interval and not args.save:
        fail("--save-interval needs --save DIR")
    if args.data_path is None and not args.mock_data:
        fail("--data-path is required (see tools/preprocess_data.py to make one; --mock-data "
             "trains on random tokens)")
    if args.data_path is not None and args.mock_data:
        fail("--mock-data replaces --data-path: give one of them")
    if args.loss_on_spans and args.mock_data:
        fail("--loss-on-spans needs datasets with loss masks (--data-path from tools/preprocess_data.py "
             "--loss-spans-key), not --mock-data")
    _validate_megatron_lm_options(args, fail)
    shape_from_checkpoint = args.init_from is not None or (args.use_checkpoint_args and args.load)
    if args.layer_pattern is None and args.num_layers is None and not shape_from_checkpoint:
        fail("give the model shape (--layer-pattern or --num-layers, --hidden-size) or --init-from")
    if not shape_from_checkpoint and args.hidden_size is None:
        fail("--hidden-size is required unless --init-from gives the model shape")
    layout_error = attention_layout_error(args.attention_mode, cp, "--attention-mode", "--context-parallel-size")
    if layout_error:  # here, before any model or data is built
        fail(layout_error)
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
    check_recompute(args.recompute_granularity, args.recompute_method, args.recompute_num_layers)
    if args.loss == "longce":
        if args.longce_stride <= 0 or args.longce_window <= args.longce_stride:
            fail("LongCE needs 0 < --longce-stride < --longce-window")
        if pp > 1:
            fail("--loss longce runs its short-context forwards through one model chunk; it "
                 "supports tensor, context and data parallelism (use --pipeline-model-parallel-size 1)")
