"""One configuration through the real training loop in this process (the run's child process).

``training.loop.set_up`` builds what ``python -m megatron_rwkvx.pretrain`` builds from the same
arguments (process group, model, DDP, optimizer, the kernel backends' start-up choice, the
``--init-from`` load); ``train_step`` is the loop's step. Around each step the device is
synchronised, so a step's seconds are the device's. The first ``warmup`` steps (Triton's compile and
autotune) are not timed. Tokens/s and TFLOP/s come from the loop's own ``Throughput`` (FLOPs:
``training.metrics.model_flops_per_token`` x 3 for forward + backward); peak memory is
``torch.cuda.max_memory_allocated`` from just after set-up (weights, gradients and optimizer state
included), on the CPU the process's peak RSS; the planner's prediction is
``parallel.memory_model.estimate`` for the same model, length and recompute flags at one GPU.
"""
from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
import traceback

import torch

from megatron_rwkvx.benchmarks.gpu_check.bench import error_status


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _planner(run) -> dict:
    from megatron_rwkvx.parallel.memory_model import estimate

    args = run.args
    layout = estimate(
        run.cfg, args.seq_length, args.micro_batch_size, tp=1, pp=1, cp=1, dp=1,
        distributed_optimizer=args.use_distributed_optimizer, sequence_parallel=False,
        recompute=(args.recompute_granularity, args.recompute_method, args.recompute_num_layers),
        backend="triton" if run.device.type == "cuda" else "torch",
    )
    return {"total_gib": layout.total_gib, "params_gib": layout.params_gib,
            "optimizer_gib": layout.optimizer_gib, "activations_gib": layout.activations_gib,
            "logits_gib": layout.logits_gib}


def run_case(argv, warmup: int) -> dict:
    """Train ``--train-iters`` steps with these trainer arguments; the figures of the run."""
    from megatron_rwkvx.training.arguments import parse_args
    from megatron_rwkvx.training.loop import Throughput, data_iterators, set_up, train_step

    args = parse_args(argv, world_size=1)
    run = set_up(args)
    device = run.device
    data = data_iterators(run, "train")
    for m in run.ddp_chunks:
        m.train()
    window = Throughput(run.cfg, args)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, seconds = [], []
    for i in range(args.train_iters):
        _sync(device)
        t0 = time.perf_counter()
        step = train_step(run, data)
        _sync(device)
        seconds.append(time.perf_counter() - t0)
        losses.append((step.totals[0] / step.totals[1].clamp_min(1)).item())
        if i >= warmup:
            window.add(dataclasses.replace(step, seconds=seconds[-1]))
    timed = window.seconds > 0
    flops = window.flops_per_device() if timed else None
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device) / 2**30, "cuda max_memory_allocated"
    else:  # ru_maxrss: KiB on Linux
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak RSS (CPU)"
    return {
        "status": "ok",
        "losses": losses,
        "step_s": seconds,
        "timed_steps": len(seconds) - warmup,
        "tokens_per_s": window.tokens_per_second() if timed else None,
        "flops_per_token": window.flops_per_token,
        "tflops_per_s": flops / 1e12 if timed else None,
        "peak_tflops": window.peak / 1e12 if window.peak else None,
        "mfu": flops / window.peak if timed and window.peak else None,
        "peak_gib": peak,
        "peak_kind": peak_kind,
        "planner": _planner(run),
        "parameters": sum(p.numel() for m in run.chunks for p in m.parameters()),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def recorded_case(argv, warmup: int) -> dict:
    """``run_case``, an error (out of memory included) recorded as its status for the table: the
    run goes on with the next configuration."""
    try:
        return run_case(argv, warmup)
    except Exception as exc:
        return {"status": error_status(exc), "traceback": traceback.format_exc()[-3000:]}


def tear_down() -> None:
    """Undo what ``set_up`` made process-wide (the process group, megatron's parallel groups and
    micro-batch calculator), so that the next configuration can set up in the same process."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    destroy_num_microbatches_calculator()
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(spec_path: str, out_path: str) -> int:
    """``spec``: {"argv": trainer arguments, "warmup": untimed steps}; the result goes to ``out``
    as JSON."""
    with open(spec_path) as f:
        spec = json.load(f)
    result = recorded_case(spec["argv"], spec["warmup"])
    with open(out_path, "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    return 0
