"""The pretraining loop on megatron-core's schedules (``get_forward_backward_func``).

``pretrain`` reads as the loop itself; its parts, in the order a run meets them:
``set_up`` (distributed init, model, optimizer, scheduler, resume; returns a ``Run``),
``train_step`` (one forward/backward over the micro-batches and the skip rule for non-finite
loss or gradients), ``evaluate``, ``SaveExitPolicy`` (exit signals, --exit-interval,
--exit-duration-in-mins, --save-interval and the final save) and ``Throughput`` (tokens/s, MFU).
Which checkpoint a run resumes, and what it refuses, is ``training.resume``.
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.num_microbatches_calculator import (
    get_num_microbatches,
    init_num_microbatches_calculator,
)
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rwkvx.checkpointing.megatron_format import load_model_checkpoint
from megatron_rwkvx.checkpointing.official_format import (
    CheckpointFormatError,
    import_state_dict,
    load_state_dict_file,
)
from megatron_rwkvx.config import ATTENTION_SYMBOL, SPARSE_MODE
from megatron_rwkvx.console import accelerations_line
from megatron_rwkvx.models.stage_payload import StagePayload
from megatron_rwkvx.pretrained import config_from_file_state_dict
from megatron_rwkvx.training import checkpointing as ckpt
from megatron_rwkvx.training import model_builder
from megatron_rwkvx.training.arguments import ArgumentError
from megatron_rwkvx.training.data import (
    build_data_iterators,
    build_run_tokenizer,
    check_data_vocab,
    loss_tokens_line,
)
from megatron_rwkvx.training.initialize import initialize_distributed, set_random_seed
from megatron_rwkvx.training.kernel_backends import log_kernel_backends
from megatron_rwkvx.training.losses import (
    longce_short_context_losses,
    longce_weights,
    longce_windows,
    masked_token_loss,
)
from megatron_rwkvx.training.iteration_hooks import IterationHooks
from megatron_rwkvx.training.rwkv_fade_in import gate_at, set_rwkv_gate
from megatron_rwkvx.training.metrics import (
    Logger,
    format_eta,
    memory_summary,
    model_flops_per_token,
    wandb_run_options,
)
from megatron_rwkvx.training.resume import CheckpointPlan, plan_checkpoints
from megatron_rwkvx.training.schedule import build_scheduler


@dataclass
class TrainState:
    """The position of a run: saved in every checkpoint, restored on resume."""

    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iters: int = 0

    @classmethod
    def from_checkpoint(cls, saved: Dict) -> "TrainState":
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


@dataclass
class Run:
    """What ``set_up`` built; the loop's pieces read it and change only ``state``."""

    args: object
    cfg: object
    device: torch.device
    logger: Logger
    tokenizer: object
    chunks: List[torch.nn.Module]  # this rank's model chunks (one per virtual pipeline stage)
    ddp_chunks: List[torch.nn.Module]
    optimizer: object
    scheduler: object
    plan: CheckpointPlan
    state: TrainState
    schedule_seq_length: int  # what megatron's schedule sizes its p2p tensors by
    forward_backward: object
    hooks: IterationHooks  # profiler window, manual GC, overlapped parameter all-gather


# ---------------------------------------------------------------------------------------------
# Set-up


def set_up(args) -> Run:
    """Distributed init, model, optimizer and scheduler; the resume (or --init-from) load."""
    initialize_distributed(args)
    set_random_seed(args.seed)
    rank = torch.distributed.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    logger = Logger(rank == torch.distributed.get_world_size() - 1, args.tensorboard_dir, wandb_run_options(args))

    tokenizer = build_run_tokenizer(args)
    cfg = model_builder.build_config(args, tokenizer.vocab_size if tokenizer is not None else None)
    check_data_vocab(args, cfg.vocab_size)
    line = loss_tokens_line(args)
    if line:
        logger.print(line)
    choices = log_kernel_backends(cfg, args.seq_length, device, logger.print)
    logger.print(accelerations_line(choice.backend for choice in choices))
    plan = plan_checkpoints(args, cfg)
    resuming = plan.resume_iteration is not None
    chunks = model_builder.build_model_chunks(cfg, args)
    if args.init_from and not resuming:
        load_initial_weights(args.init_from, cfg, chunks)
    if args.train_only == "sparse":
        trainable = model_builder.freeze_for_stage1(chunks)
        logger.print(f"stage 1: training only the sparse-attention blocks ({trainable:,} parameters on this rank)")
    ddp_chunks = model_builder.wrap_ddp(chunks, cfg, args)
    optimizer = model_builder.build_optimizer(ddp_chunks, cfg, args)
    scheduler = build_scheduler(optimizer, args)
    _connect_schedule_hooks(cfg, ddp_chunks, optimizer, args.overlap_grad_reduce)
    init_num_microbatches_calculator(
        rank, None, args.global_batch_size, args.micro_batch_size, args.data_parallel_size
    )
    run = Run(args, cfg, device, logger, tokenizer, chunks, ddp_chunks, optimizer, scheduler, plan,
              TrainState(), StagePayload.schedule_seq_length(cfg, args.seq_length),
              get_forward_backward_func(), IterationHooks(args, ddp_chunks, rank, logger.print))
    if resuming:
        _resume(run)
    return run


def _connect_schedule_hooks(cfg, ddp_chunks, optimizer, overlap_grad_reduce: bool) -> None:
    """megatron-core's schedule finds loss scaling and gradient sync through the model config."""
    cfg.grad_scale_func = optimizer.scale_loss
    cfg.finalize_model_grads_func = finalize_model_grads
    no_sync = [m.no_sync for m in ddp_chunks]
    cfg.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if overlap_grad_reduce:
        syncs = [m.start_grad_sync for m in ddp_chunks]
        cfg.grad_sync_func = syncs[0] if len(syncs) == 1 else syncs


def _resume(run: Run) -> None:
    args = run.args
    try:
        saved = ckpt.load_checkpoint(args.load, run.ddp_chunks, run.optimizer, run.scheduler, args,
                                     run.cfg, run.logger.print, iteration=run.plan.resume_iteration)
    except CheckpointFormatError as err:  # a checkpoint that does not fit this run: no traceback
        raise ArgumentError(f"--load {args.load}: {err}") from err
    run.state = TrainState.from_checkpoint(saved)
    run.logger.print(f"resumed from {args.load} at iteration {run.state.iteration}")


def load_initial_weights(path: str, cfg, chunks) -> None:
    """--init-from: the weights of a checkpoint directory or an official-layout .pth."""
    if os.path.isdir(path):
        # All chunks of a rank read their own shards from the same directory.
        for chunk in chunks:
            load_model_checkpoint(chunk, cfg, path)
        return
    sd = load_state_dict_file(path)
    _, layout = config_from_file_state_dict(sd)
    for chunk in chunks:
        import_state_dict(chunk, sd, cfg, layout, path=path)


def data_iterators(run: Run, split: str):
    """One iterator per model chunk (megatron's interleaved schedule takes a list)."""
    consumed = run.state.consumed_train_samples if split == "train" else 0
    iters = [build_data_iterators(run.args, run.tokenizer, split, consumed) for _ in run.ddp_chunks]
    return iters if len(iters) > 1 else iters[0]


# ---------------------------------------------------------------------------------------------
# The step


def _cp_slice(t: torch.Tensor) -> torch.Tensor:
    """This context-parallel rank's contiguous slice of a [B, S] batch tensor."""
    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return t
    rank = parallel_state.get_context_parallel_rank()
    s = t.shape[1] // cp
    return t[:, rank * s : (rank + 1) * s]


def forward_step(args, device, data_iterator, model):
    """megatron-core's ``forward_step_func``: one micro-batch's output and its loss function."""
    batch = next(data_iterator)
    tokens = batch["tokens"].to(device)
    labels = batch["labels"].to(device)
    loss_mask = batch["loss_mask"].to(device)
    weights = None
    if args.loss == "longce" and model.training:
        # Batched short-context forwards without gradient; their tokens count in the throughput.
        short, scored = longce_short_context_losses(
            model, tokens, labels, args.longce_window, args.longce_stride
        )
        output = model(_cp_slice(tokens), labels=_cp_slice(labels))
        # The short-context losses cover the whole sequence: weight this CP shard's part of it.
        weights = longce_weights(output, _cp_slice(short), _cp_slice(scored), args.longce_tau)
    else:
        output = model(_cp_slice(tokens), labels=_cp_slice(labels))
    mask = _cp_slice(loss_mask)

    def loss_func(output_tensor):
        return masked_token_loss(output_tensor, mask, weights)

    return output, loss_func


def reduce_reports(reports: List[Dict]) -> Optional[torch.Tensor]:
    """[loss sum, tokens] over micro-batches and data/context-parallel ranks (last stage only)."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True) or not reports:
        return None
    total = torch.stack([r["lm loss"] for r in reports]).sum(0)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return total


def _broadcast_from_last_stage(value: Optional[torch.Tensor], device) -> torch.Tensor:
    """Share the last stage's numbers with every rank (so every rank can decide to skip/stop)."""
    out = value if value is not None else torch.zeros(2, device=device)
    out = out.to(device=device, dtype=torch.float32)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast(out, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return out


def _any_rank(flag: bool, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def _grads_finite(ddp_chunks) -> bool:
    ok = True
    for chunk in ddp_chunks:
        for buffer in chunk.buffers:
            if not torch.isfinite(buffer.grad_data).all():
                ok = False
    return ok


def _run_schedule(run: Run, iterators, forward_only: bool) -> Optional[torch.Tensor]:
    """All micro-batches of one global batch through megatron-core's schedule; the last stage's
    [loss sum, tokens] on every rank."""
    reports = run.forward_backward(
        forward_step_func=partial(forward_step, run.args, run.device),
        data_iterator=iterators,
        model=run.ddp_chunks,
        num_microbatches=get_num_microbatches(),
        seq_length=run.schedule_seq_length,
        micro_batch_size=run.args.micro_batch_size,
        forward_only=forward_only,
    )
    return reduce_reports(reports)


@dataclass
class StepResult:
    totals: torch.Tensor  # [loss sum, tokens] of the global batch
    applied: bool  # False: non-finite loss or gradients, the optimizer step was skipped
    grad_norm: Optional[float]
    seconds: float


def train_step(run: Run, iterators) -> StepResult:
    """One optimizer step; a step with non-finite loss or gradients is skipped (and counted)."""
    start = time.time()
    for m in run.ddp_chunks:
        m.zero_grad_buffer()
    run.optimizer.zero_grad()
    totals = _broadcast_from_last_stage(_run_schedule(run, iterators, forward_only=False), run.device)
    loss = (totals[0] / totals[1].clamp_min(1)).item()
    state, args = run.state, run.args
    grad_norm = None
    if args.fp16:
        # The loss scaler finds overflowing gradients itself and lowers the scale: its skips are
        # how fp16 training finds its scale, not divergence, and are not counted.
        ok, grad_norm, _ = run.optimizer.step()
        applied = bool(ok)
        if not applied:
            run.logger.print(f"iteration {state.iteration + 1}: fp16 gradients overflowed, step skipped "
                             f"(loss scale now {run.optimizer.get_loss_scale().item():g})")
    else:
        applied = math.isfinite(loss) and not _any_rank(not _grads_finite(run.ddp_chunks), run.device)
        if applied:
            ok, grad_norm, _ = run.optimizer.step()
            applied = bool(ok) and (grad_norm is None or math.isfinite(grad_norm))
    if applied:
        run.scheduler.step(increment=args.lr_schedule_unit)  # iterations, or samples (--train-samples)
    elif not args.fp16:
        state.skipped_iters += 1
        run.logger.print(f"iteration {state.iteration + 1}: non-finite loss or gradients, step skipped "
                         f"({state.skipped_iters} of at most {args.max_skipped_iters})")
    state.iteration += 1
    state.consumed_train_samples += args.global_batch_size
    return StepResult(totals, applied, grad_norm, time.time() - start)


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate(run: Run, iterators) -> float:
    """The mean validation loss over --eval-iters global batches."""
    for m in run.ddp_chunks:
        m.eval()
    total = torch.zeros(2, device=run.device)
    with torch.no_grad():
        for _ in range(run.args.eval_iters):
            r = _run_schedule(run, iterators, forward_only=True)
            if r is not None:
                total += r.to(run.device)
    for m in run.ddp_chunks:
        m.train()
    total = _broadcast_from_last_stage(total, run.device)
    if total[1] <= 0:
        return float("nan")  # no token to score (--loss-on-spans batches without a mark), not a loss of 0
    return (total[0] / total[1]).item()


def _log_validation(run: Run, loss: float, iteration: int) -> None:
    run.logger.print(f"validation at iteration {iteration} | loss {loss:.6f} | "
                     f"ppl {math.exp(min(loss, 50)):.3f}")


# ---------------------------------------------------------------------------------------------
# Throughput


class Throughput:
    """Tokens/s, TFLOP/s per device and MFU over the steps since the last log line. Only the
    training steps are timed: evaluation and saves fall outside the window."""

    def __init__(self, cfg, args):
        self.args = args
        self.flops_per_token = model_flops_per_token(cfg, args.seq_length)
        self.extra_forward_tokens = 0  # LongCE's forward-only short windows, per sequence
        if args.loss == "longce":
            self.extra_forward_tokens = (
                len(longce_windows(args.seq_length, args.longce_window, args.longce_stride)) * args.longce_window
            )
        self.peak = args.peak_tflops * 1e12 if args.peak_tflops else (989e12 if args.device == "cuda" else None)
        self.reset()

    def reset(self) -> None:
        self.seconds, self.tokens = 0.0, 0
        self.loss = torch.zeros(2)

    def add(self, step: StepResult) -> None:
        self.tokens += self.args.global_batch_size * self.args.seq_length
        self.seconds += step.seconds
        if step.applied:
            self.loss += step.totals.cpu()

    def mean_loss(self) -> float:
        return (self.loss[0] / self.loss[1].clamp_min(1)).item() if self.loss[1] > 0 else float("nan")

    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def flops_per_device(self) -> float:
        tok_s = self.tokens_per_second()
        # Training = forward + backward (3x forward); LongCE adds forward-only short windows.
        flops = tok_s * 3 * self.flops_per_token + (
            tok_s / self.args.seq_length * self.extra_forward_tokens * self.flops_per_token
        )
        return flops / self.args.world_size

    def mfu(self) -> str:
        return f"{100 * self.flops_per_device() / self.peak:.1f}%" if self.peak else "-"


def _log_progress(run: Run, window: Throughput, grad_norm: Optional[float], eta_seconds: float) -> None:
    args, it, skipped = run.args, run.state.iteration, run.state.skipped_iters
    avg, tok_s, per_device = window.mean_loss(), window.tokens_per_second(), window.flops_per_device()
    lr = run.scheduler.get_lr(run.optimizer.param_groups[0]) if run.optimizer.param_groups else args.lr
    run.logger.print(
        f"iteration {it:>7}/{args.train_iters} | loss {avg:.6f} | lr {lr:.3e} | "
        f"grad norm {grad_norm if grad_norm is None else f'{grad_norm:.3f}'} | "
        f"tokens/s {tok_s:,.0f} | TFLOP/s/device {per_device / 1e12:.3f} | MFU {window.mfu()} | "
        f"{memory_summary(args.device)} | skipped {skipped} | "
        + (f"rwkv gate {gate_at(it, args.rwkv_fade_in):.3f} | " if args.rwkv_fade_in else "")
        + (f"loss scale {run.optimizer.get_loss_scale().item():g} | " if args.fp16 else "")
        + f"ETA {format_eta(eta_seconds)}"
    )
    run.logger.scalars({"train/loss": avg, "train/lr": lr, "train/grad_norm": grad_norm,
                        "train/tokens_per_s": tok_s, "train/tflops_per_device": per_device / 1e12,
                        "train/skipped_iters": skipped}, it)


# ---------------------------------------------------------------------------------------------
# Save and exit policy


class ExitSignal:
    """SIGTERM / SIGUSR1 (Slurm's warning before the time limit) ask for a save and a clean exit."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signal.Signals(signum).name


class SaveExitPolicy:
    """When the loop saves and when it stops early, decided alike on every rank."""

    def __init__(self, args, device, start_time: float, start_iteration: int):
        self.args, self.device = args, device
        self.start_time, self.start_iteration = start_time, start_iteration
        self.signal = ExitSignal()

    def exit_reason(self, iteration: int) -> Optional[str]:
        """Why the run saves and exits after ``iteration`` (collective: every rank calls it)."""
        args = self.args
        if _any_rank(self.signal.received is not None, self.device):
            return "signal"
        if args.exit_duration_in_mins is not None and _any_rank(
                (time.time() - self.start_time) / 60 > args.exit_duration_in_mins, self.device):
            return "time limit"
        if args.exit_interval and iteration % args.exit_interval == 0:
            return "exit interval"
        return None

    def interval_save_due(self, iteration: int) -> bool:
        return bool(self.args.save_interval) and iteration % self.args.save_interval == 0

    def final_save_due(self, iteration: int) -> bool:
        # A resume at the last iteration trains nothing: saving again would only rewrite (delete,
        # then write) the checkpoint it loaded. An interval save of the last iteration suffices.
        return iteration > self.start_iteration and not self.interval_save_due(iteration)


def save(run: Run, reason: str) -> None:
    if run.args.save:
        with run.hooks.outside_training():
            target = ckpt.save_checkpoint(run.args.save, run.state.iteration, run.ddp_chunks, run.optimizer,
                                          run.scheduler, run.args, run.cfg, asdict(run.state), run.plan)
        run.logger.print(f"saved checkpoint ({reason}) to {target}")
        gate = gate_at(run.state.iteration, run.args.rwkv_fade_in)
        if gate < 1.0:
            run.logger.print(
                f"warning: this checkpoint was saved during --rwkv-fade-in (RWKV-7 gate {gate:.3f} < 1): "
                "resume it to finish the fade-in; exported or evaluated as it is, its RWKV-7 blocks "
                "act at full strength and it is not the model that was trained"
            )


# ---------------------------------------------------------------------------------------------
# The loop


def _log_model(run: Run) -> None:
    args, cfg = run.args, run.cfg
    params = sum(p.numel() for m in run.chunks for p in m.parameters())
    # What the A blocks compute, where a stage may have changed it from its --init-from checkpoint.
    sparse = (f" ({cfg.attention_mode} attention" + (
        f": chunk {cfg.sparse_chunk_size}, top-k {cfg.sparse_top_k}, selection {cfg.sparse_selection}"
        if cfg.attention_mode == SPARSE_MODE else "") + ")") if ATTENTION_SYMBOL in cfg.layer_pattern else ""
    run.logger.print(
        f"model: pattern {cfg.layer_pattern}{sparse}, width {cfg.hidden_size}, {params:,} parameters on "
        f"this rank; layout tp={args.tensor_model_parallel_size} pp={args.pipeline_model_parallel_size} "
        f"cp={args.context_parallel_size} dp={args.data_parallel_size}; device {args.device}"
    )


def pretrain(args) -> int:
    """Run training as described by ``args``; returns the process exit code."""
    run = set_up(args)
    train_data = data_iterators(run, "train")
    if args.eval_iters > 0:
        data_iterators(run, "valid")  # fail now, not at the first evaluation, if the split is unusable
    if args.skip_train:
        _log_validation(run, evaluate(run, data_iterators(run, "valid")), run.state.iteration)
        run.logger.close()
        return 0
    start_time, start_iteration = time.time(), run.state.iteration
    policy = SaveExitPolicy(args, run.device, start_time, start_iteration)
    _log_model(run)
    window = Throughput(run.cfg, args)
    for m in run.ddp_chunks:
        m.train()
    exit_code = 0
    while run.state.iteration < args.train_iters:
        run.hooks.before_iteration(run.state.iteration + 1)
        if args.rwkv_fade_in:
            set_rwkv_gate(run.chunks, gate_at(run.state.iteration + 1, args.rwkv_fade_in))
        step = train_step(run, train_data)
        window.add(step)
        it = run.state.iteration
        run.hooks.after_iteration(it)
        if it % args.log_interval == 0 or it == args.train_iters:
            # After a resume the ETA counts this run's iterations.
            eta = (time.time() - start_time) / max(it - start_iteration, 1) * (args.train_iters - it)
            _log_progress(run, window, step.grad_norm, eta)
            window.reset()
        if args.eval_iters > 0 and (it % args.eval_interval == 0 or it == args.train_iters):
            with run.hooks.outside_training():
                val = evaluate(run, data_iterators(run, "valid"))
            _log_validation(run, val, it)
            run.logger.scalars({"valid/loss": val}, it)
        if run.state.skipped_iters >= args.max_skipped_iters:
            run.logger.print(f"error: {run.state.skipped_iters} steps had non-finite loss or gradients; "
                             "stopping (lower --lr, check the data, or raise --max-skipped-iters)")
            exit_code = 3
            break
        why = policy.exit_reason(it)
        if why:
            save(run, why)
            run.logger.print(f"exiting at iteration {it} ({why})")
            run.hooks.close()
            run.logger.close()
            return 0
        if policy.interval_save_due(it):
            save(run, "interval")
    if exit_code == 0 and policy.final_save_due(run.state.iteration):
        save(run, "end of training")
    run.logger.print(f"done: {run.state.iteration} iterations in {format_eta(time.time() - start_time)}")
    run.hooks.close()
    run.logger.close()
    return exit_code
