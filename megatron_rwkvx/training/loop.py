"""The pretraining loop on megatron-core's schedules (``get_forward_backward_func``)."""
from __future__ import annotations

import math
import os
import signal
import time
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

from megatron_rwkvx.checkpointing.official_format import CheckpointFormatError
from megatron_rwkvx.training import checkpointing as ckpt
from megatron_rwkvx.training.arguments import ArgumentError
from megatron_rwkvx.training.initialize import initialize_distributed, set_random_seed
from megatron_rwkvx.training.losses import (
    longce_short_context_losses,
    longce_weights,
    longce_windows,
    masked_token_loss,
)
from megatron_rwkvx.training.iteration_hooks import IterationHooks
from megatron_rwkvx.training.metrics import (
    Logger,
    format_eta,
    memory_summary,
    model_flops_per_token,
    wandb_run_options,
)
from megatron_rwkvx.training.schedule import build_scheduler
from megatron_rwkvx.training import model_builder


class _ExitSignal:
    """SIGTERM / SIGUSR1 (Slurm's warning before the time limit) ask for a save and a clean exit."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signal.Signals(signum).name


def _any_rank(flag: bool, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def _cp_slice(t: torch.Tensor) -> torch.Tensor:
    """This context-parallel rank's contiguous slice of a [B, S] batch tensor."""
    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return t
    rank = parallel_state.get_context_parallel_rank()
    s = t.shape[1] // cp
    return t[:, rank * s : (rank + 1) * s]


def _forward_step(args, device, data_iterator, model):
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
        weights = longce_weights(output, short, scored, args.longce_tau)
    else:
        output = model(_cp_slice(tokens), labels=_cp_slice(labels))
    mask = _cp_slice(loss_mask)

    def loss_func(output_tensor):
        return masked_token_loss(output_tensor, mask, weights)

    return output, loss_func


def _schedule_seq_length(args) -> int:
    from megatron_rwkvx.models.rwkvx_model import pipeline_seq_length

    return pipeline_seq_length(args.model_config, args.seq_length)


def _reduce_reports(reports: List[Dict]) -> Optional[torch.Tensor]:
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


def _grads_finite(ddp_chunks) -> bool:
    ok = True
    for chunk in ddp_chunks:
        for buffer in chunk.buffers:
            if not torch.isfinite(buffer.grad_data).all():
                ok = False
    return ok


def evaluate(args, device, ddp_chunks, valid_iters, forward_backward) -> Optional[float]:
    for m in ddp_chunks:
        m.eval()
    total = torch.zeros(2, device=device)
    with torch.no_grad():
        for _ in range(args.eval_iters):
            reports = forward_backward(
                forward_step_func=partial(_forward_step, args, device),
                data_iterator=valid_iters if len(valid_iters) > 1 else valid_iters[0],
                model=ddp_chunks,
                num_microbatches=get_num_microbatches(),
                seq_length=_schedule_seq_length(args),
                micro_batch_size=args.micro_batch_size,
                forward_only=True,
            )
            r = _reduce_reports(reports)
            if r is not None:
                total += r.to(device)
    for m in ddp_chunks:
        m.train()
    total = _broadcast_from_last_stage(total, device)
    return (total[0] / total[1].clamp_min(1)).item()


def pretrain(args) -> int:
    """Run training as described by ``args``; returns the process exit code."""
    initialize_distributed(args)
    set_random_seed(args.seed)
    rank = torch.distributed.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    logger = Logger(rank == torch.distributed.get_world_size() - 1, args.tensorboard_dir, wandb_run_options(args))

    from megatron_rwkvx.training.data import build_data_iterators, build_run_tokenizer, check_data_vocab

    tokenizer = build_run_tokenizer(args)
    cfg = model_builder.build_config(args, tokenizer.vocab_size if tokenizer is not None else None)
    check_data_vocab(args, cfg.vocab_size)
    args.model_config = cfg
    plan = ckpt.plan_checkpoints(args, cfg)
    resuming = plan.resume_iteration is not None
    chunks = model_builder.build_model_chunks(cfg, args)
    if args.init_from and not resuming:
        _load_initial_weights(args, cfg, chunks)
    if args.train_only == "sparse":
        trainable = model_builder.freeze_for_stage1(chunks)
        logger.print(f"stage 1: training only the sparse-attention blocks ({trainable:,} parameters on this rank)")
    ddp_chunks = model_builder.wrap_ddp(chunks, cfg, args)
    optimizer = model_builder.build_optimizer(ddp_chunks, cfg, args)
    scheduler = build_scheduler(optimizer, args)

    cfg.grad_scale_func = optimizer.scale_loss
    cfg.finalize_model_grads_func = finalize_model_grads
    no_sync = [m.no_sync for m in ddp_chunks]
    cfg.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if args.overlap_grad_reduce:
        syncs = [m.start_grad_sync for m in ddp_chunks]
        cfg.grad_sync_func = syncs[0] if len(syncs) == 1 else syncs

    init_num_microbatches_calculator(
        rank, None, args.global_batch_size, args.micro_batch_size, args.data_parallel_size
    )
    state = {"iteration": 0, "consumed_train_samples": 0, "skipped_iters": 0}
    if resuming:
        try:
            state.update(ckpt.load_checkpoint(args.load, ddp_chunks, optimizer, scheduler, args, cfg,
                                              logger.print, iteration=plan.resume_iteration))
        except CheckpointFormatError as err:  # a checkpoint that does not fit this run: no traceback
            raise ArgumentError(f"--load {args.load}: {err}") from err
        logger.print(f"resumed from {args.load} at iteration {state['iteration']}")

    n_chunks = len(ddp_chunks)
    train_iters = [
        build_data_iterators(args, tokenizer, "train", state["consumed_train_samples"]) for _ in range(n_chunks)
    ]
    def valid_iters():
        return [build_data_iterators(args, tokenizer, "valid", 0) for _ in range(n_chunks)]

    if args.eval_iters > 0:
        valid_iters()  # fail now, not at the first evaluation, if the split is unusable

    forward_backward = get_forward_backward_func()
    if args.skip_train:
        val = evaluate(args, device, ddp_chunks, valid_iters(), forward_backward)
        logger.print(f"validation at iteration {state['iteration']} | loss {val:.6f} | "
                     f"ppl {math.exp(min(val, 50)):.3f}")
        logger.close()
        return 0
    exit_signal = _ExitSignal()
    hooks = IterationHooks(args, ddp_chunks, rank, logger.print)
    params = sum(p.numel() for m in chunks for p in m.parameters())
    logger.print(
        f"model: pattern {cfg.layer_pattern}, width {cfg.hidden_size}, {params:,} parameters on "
        f"this rank; layout tp={args.tensor_model_parallel_size} pp={args.pipeline_model_parallel_size} "
        f"cp={args.context_parallel_size} dp={args.data_parallel_size}; device {args.device}"
    )
    flops_per_token = model_flops_per_token(cfg, args.seq_length)
    extra_forward_tokens = 0
    if args.loss == "longce":
        extra_forward_tokens = len(longce_windows(args.seq_length, args.longce_window, args.longce_stride)) * args.longce_window
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (989e12 if args.device == "cuda" else None)

    start_time = time.time()
    start_iteration = state["iteration"]  # after a resume the ETA counts this run's iterations
    # Throughput covers the training steps only: evaluation and saves are timed out of it.
    window_time, window_tokens = 0.0, 0
    window_loss = torch.zeros(2)
    exit_code = 0
    for m in ddp_chunks:
        m.train()

    def save(reason: str):
        if args.save:
            with hooks.outside_training():
                target = ckpt.save_checkpoint(
                    args.save, state["iteration"], ddp_chunks, optimizer, scheduler, args, cfg, state, plan
                )
            logger.print(f"saved checkpoint ({reason}) to {target}")

    while state["iteration"] < args.train_iters:
        hooks.before_iteration(state["iteration"] + 1)
        step_start = time.time()
        for m in ddp_chunks:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(
            forward_step_func=partial(_forward_step, args, device),
            data_iterator=train_iters if n_chunks > 1 else train_iters[0],
            model=ddp_chunks,
            num_microbatches=get_num_microbatches(),
            seq_length=_schedule_seq_length(args),
            micro_batch_size=args.micro_batch_size,
            forward_only=False,
        )
        totals = _broadcast_from_last_stage(_reduce_reports(reports), device)
        loss = (totals[0] / totals[1].clamp_min(1)).item()
        grad_norm = None
        if args.fp16:
            # The loss scaler finds overflowing gradients itself and lowers the scale: its skips
            # are how fp16 training finds its scale, not divergence, and are not counted.
            ok, grad_norm, _ = optimizer.step()
            finite = bool(ok)
            if not finite:
                logger.print(f"iteration {state['iteration'] + 1}: fp16 gradients overflowed, step skipped "
                             f"(loss scale now {optimizer.get_loss_scale().item():g})")
        else:
            finite = math.isfinite(loss) and not _any_rank(not _grads_finite(ddp_chunks), device)
            if finite:
                ok, grad_norm, _ = optimizer.step()
                finite = bool(ok) and (grad_norm is None or math.isfinite(grad_norm))
        if finite:
            scheduler.step(increment=args.lr_schedule_unit)
        elif not args.fp16:
            state["skipped_iters"] += 1
            logger.print(f"iteration {state['iteration'] + 1}: non-finite loss or gradients, step skipped "
                         f"({state['skipped_iters']} of at most {args.max_skipped_iters})")
        state["iteration"] += 1
        state["consumed_train_samples"] += args.global_batch_size
        tokens_this_iter = args.global_batch_size * args.seq_length
        window_tokens += tokens_this_iter
        window_time += time.time() - step_start
        if finite:
            window_loss += totals.cpu()

        it = state["iteration"]
        hooks.after_iteration(it)
        if it % args.log_interval == 0 or it == args.train_iters:
            tok_s = window_tokens / max(window_time, 1e-9)
            # Training = forward + backward (3x forward); LongCE adds forward-only short windows.
            flops = tok_s * 3 * flops_per_token + (
                tok_s / args.seq_length * extra_forward_tokens * flops_per_token
            )
            per_device = flops / args.world_size
            mfu = f"{100 * per_device / peak:.1f}%" if peak else "-"
            avg = (window_loss[0] / window_loss[1].clamp_min(1)).item() if window_loss[1] > 0 else float("nan")
            lr = scheduler.get_lr(optimizer.param_groups[0]) if optimizer.param_groups else args.lr
            eta = (time.time() - start_time) / max(it - start_iteration, 1) * (args.train_iters - it)
            logger.print(
                f"iteration {it:>7}/{args.train_iters} | loss {avg:.6f} | lr {lr:.3e} | "
                f"grad norm {grad_norm if grad_norm is None else f'{grad_norm:.3f}'} | "
                f"tokens/s {tok_s:,.0f} | TFLOP/s/device {per_device / 1e12:.3f} | MFU {mfu} | "
                f"{memory_summary(args.device)} | skipped {state['skipped_iters']} | "
                + (f"loss scale {optimizer.get_loss_scale().item():g} | " if args.fp16 else "")
                + f"ETA {format_eta(eta)}"
            )
            logger.scalars({"train/loss": avg, "train/lr": lr, "train/grad_norm": grad_norm,
                            "train/tokens_per_s": tok_s, "train/tflops_per_device": per_device / 1e12,
                            "train/skipped_iters": state["skipped_iters"]}, it)
            window_time, window_tokens = 0.0, 0
            window_loss.zero_()

        if args.eval_iters > 0 and (it % args.eval_interval == 0 or it == args.train_iters):
            with hooks.outside_training():
                val = evaluate(args, device, ddp_chunks, valid_iters(), forward_backward)
            logger.print(f"validation at iteration {it} | loss {val:.6f} | ppl {math.exp(min(val, 50)):.3f}")
            logger.scalars({"valid/loss": val}, it)

        if state["skipped_iters"] >= args.max_skipped_iters:
            logger.print(f"error: {state['skipped_iters']} steps had non-finite loss or gradients; "
                         "stopping (lower --lr, check the data, or raise --max-skipped-iters)")
            exit_code = 3
            break
        signalled = _any_rank(exit_signal.received is not None, device)
        timed_out = args.exit_duration_in_mins is not None and _any_rank(
            (time.time() - start_time) / 60 > args.exit_duration_in_mins, device)
        if signalled or timed_out or (args.exit_interval and it % args.exit_interval == 0):
            why = "signal" if signalled else ("time limit" if timed_out else "exit interval")
            save(why)
            logger.print(f"exiting at iteration {it} ({why})")
            hooks.close()
            logger.close()
            return 0
        if args.save_interval and it % args.save_interval == 0:
            save("interval")

    # A resume at the last iteration trains nothing: saving again would only rewrite (delete,
    # then write) the checkpoint it loaded.
    if (exit_code == 0 and args.save and state["iteration"] > start_iteration
            and (not args.save_interval or state["iteration"] % args.save_interval)):
        save("end of training")
    logger.print(f"done: {state['iteration']} iterations in {format_eta(time.time() - start_time)}")
    hooks.close()
    logger.close()
    return exit_code


def _load_initial_weights(args, cfg, chunks) -> None:
    if os.path.isdir(args.init_from):
        from megatron_rwkvx.checkpointing.megatron_format import load_model_checkpoint

        # All chunks of a rank read their own shards from the same directory.
        if len(chunks) == 1:
            load_model_checkpoint(chunks[0], cfg, args.init_from)
        else:
            for chunk in chunks:
                load_model_checkpoint(chunk, cfg, args.init_from)
        return
    from megatron_rwkvx.checkpointing.official_format import import_state_dict, load_state_dict_file
    from megatron_rwkvx.pretrained import config_from_file_state_dict

    sd = load_state_dict_file(args.init_from)
    _, layout = config_from_file_state_dict(sd)
    for chunk in chunks:
        import_state_dict(chunk, sd, cfg, layout, path=args.init_from)
