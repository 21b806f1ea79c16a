"""Resumable training checkpoints on ``dist_checkpointing``.

Each save is a directory ``iter_{N:07d}`` holding the sharded model and optimizer, the scheduler,
the iteration and data position (common state), and one small RNG file per rank. The
``latest_checkpointed_iteration.txt`` pointer is rewritten (atomically) only after every rank
finished writing and the iteration's manifest (every file's size and CRC-32, see
``checkpointing.manifest``) is on disk, so a run killed mid-save resumes from the previous
checkpoint. A resume verifies the manifest: a damaged or incomplete iteration is named with the
newest intact earlier one (``--ckpt-step N`` loads it, ``--auto-fallback`` does so unattended);
iterations saved before manifests existed load unverified, with a note. A save that fails (disk
full) removes its partial directory and stops with an ``error:`` line. Tensors carry
global layer numbers and tensor-parallel axes, so a checkpoint loads into another tensor/pipeline
layout (the RNG files are then skipped with a note: they are per rank).

A run never destroys another run's checkpoints: before any training work ``training.resume``
refuses a --save directory of another architecture, or one holding a checkpoint newer than where
the run starts (unless it resumes that very directory), and --keep-last-checkpoints deletes only
the saves of the run itself and of the run it continues.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import queue
import re
import shutil
import signal
from contextlib import contextmanager
from typing import List, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from torch.distributed.checkpoint import CheckpointException

from megatron_rwkvx.checkpointing.megatron_format import (
    LATEST_FILE,
    MODEL_CONFIG_FILE,
    architecture_of,
    check_architecture,
    is_complete_checkpoint,
    iteration_dir,
    read_latest_iteration,
    read_model_config,
    saved_iterations,
    write_text_atomic,
)
from megatron_rwkvx.checkpointing import manifest
from megatron_rwkvx.checkpointing.official_format import CheckpointFormatError
from megatron_rwkvx.errors import UsageError
from megatron_rwkvx.training.checkpoint_integrity import damaged_checkpoint_advice
from megatron_rwkvx.training.initialize import rng_state, set_rng_state
from megatron_rwkvx.training.resume import CheckpointPlan


def _model_keys(n: int) -> List[str]:
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


# The keys of ``_layout`` that place per-rank state (the RNG files are valid only when they match).
_PARALLEL_LAYOUT_KEYS = ("world_size", "tp", "pp", "cp", "vpp", "distributed_optimizer")


def _layout(args) -> dict:
    return {
        "world_size": args.world_size,
        "tp": args.tensor_model_parallel_size,
        "pp": args.pipeline_model_parallel_size,
        "cp": args.context_parallel_size,
        "vpp": args.virtual_pipeline_model_parallel_size,
        "distributed_optimizer": bool(args.use_distributed_optimizer),
        # Stage 1 has optimizer state for the sparse blocks only: a resume must train the same set.
        "train_only": args.train_only,
        # A run saved mid --rwkv-fade-in trained beside partly silenced RWKV-7 blocks: a resume must
        # finish the same schedule.
        "rwkv_fade_in": list(args.rwkv_fade_in) if args.rwkv_fade_in else None,
    }


def _same_parallel_layout(saved: Optional[dict], args) -> bool:
    saved, ours = saved or {}, _layout(args)
    return bool(saved) and all(saved.get(k) == ours[k] for k in _PARALLEL_LAYOUT_KEYS)


def _optimizer_metadata(args, saved_type: Optional[str] = None) -> Optional[dict]:
    """How the distributed optimizer lays out its state in the checkpoint. megatron-core's default
    (``fully_sharded_model_space``) cannot be saved any more in 0.16 (flattened ranges are
    refused), so the type is always explicit: ``dp_reshardable`` (megatron-LM's default; loads at
    the same TP/PP) or ``fully_reshardable``; a load uses the type the save used."""
    if not args.use_distributed_optimizer:
        return None
    if saved_type is None:
        saved_type = "fully_reshardable" if args.dist_ckpt_optim_fully_reshardable else "dp_reshardable"
    return {"distrib_optim_sharding_type": saved_type}


def _torch_adam_distributed_optimizers(optimizer):
    """The distributed optimizers of ``optimizer`` whose inner optimizer is torch's Adam (megatron-core
    uses it when neither Transformer Engine nor Apex is installed); none otherwise."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    if dopt.HAVE_APEX_OR_TE:
        return []
    return [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(opt, dopt.DistributedOptimizer)]


def _prime_torch_adam_state(optimizer) -> None:
    """megatron-core's ``DistributedOptimizer.state_dict()`` reads torch Adam's per-parameter
    ``step``, which torch creates only at its first step: a resume, which asks for the state before
    any step, fails on an assertion. Create the state as a first step would; the load overwrites
    it."""
    for opt in _torch_adam_distributed_optimizers(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "step" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
                    st.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))


def _restore_torch_adam_step(optimizer) -> None:
    """After the load, torch Adam's per-parameter ``step`` still holds the primed value, while
    megatron-core keeps the saved step count in the param groups: copy it over, or Adam's bias
    correction restarts and the resumed run diverges from the uninterrupted one."""
    for opt in _torch_adam_distributed_optimizers(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                if "step" in inner.state[p]:
                    inner.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def _sharded_state(chunks, optimizer, is_loading: bool, with_optimizer: bool, metadata=None) -> dict:
    state = {}
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        state[key] = chunk.module.sharded_state_dict()
    if with_optimizer and optimizer is not None:
        if is_loading:
            _prime_torch_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


class CheckpointSaveError(UsageError):
    """A save the filesystem refused (disk full, quota, permissions): not a bug of the run."""


def _fault(name: str, iteration: int) -> bool:
    """Fault injection for the fault-tolerance tests (tests/test_fault_injection.py):
    MEGATRON_RWKVX_FAULT_<name>=<iteration>."""
    return os.environ.get(f"MEGATRON_RWKVX_FAULT_{name}") == str(iteration)


def _wrapped(err: BaseException) -> List[BaseException]:
    """The exceptions ``err`` wraps: its cause or context, and the per-rank failures a
    torch.distributed.checkpoint CheckpointException carries as (exception, traceback) pairs."""
    inner = [f[0] if isinstance(f, tuple) else f for f in (getattr(err, "failures", None) or {}).values()]
    return [e for e in (*inner, err.__cause__, err.__context__) if isinstance(e, BaseException)]


def _find_error(err: BaseException, kind) -> Optional[BaseException]:
    """The first exception of type ``kind`` in ``err`` or what it wraps: dist_checkpointing
    reports a failed writer process as a RuntimeError or CheckpointException around it."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        todo.extend(_wrapped(e))
    return None


def _filesystem_error(err: BaseException) -> Optional[OSError]:
    """The OSError behind a failed save. A writer process's error reaches this process gathered
    (pickled) across ranks, which drops its cause: then only its message still tells."""
    found = _find_error(err, OSError)
    if found is None:
        todo = [err] + _wrapped(err)
        for e in todo:
            if m := re.search(r"\[Errno (\d+)\] ([^\n'\"]+)", str(e)):
                return OSError(int(m.group(1)), m.group(2).strip())
    return found


def _write_manifest(target: str, rank: int) -> None:
    """Collective: every rank checksums (and syncs) a share of the iteration's files; rank 0 writes
    the manifest. The files are on a filesystem every rank sees (as dist_checkpointing needs)."""
    world = torch.distributed.get_world_size()
    names = manifest.manifest_candidates(target)
    parts = [None] * world
    torch.distributed.all_gather_object(parts, manifest.describe_files(target, manifest.share(names, rank, world)))
    if rank == 0:
        manifest.write_manifest(target, {n: e for part in parts for n, e in part.items()})


def _in_process_write_results() -> None:
    """dist_checkpointing collects its writer processes' results through a queue that a spawned
    multiprocessing manager serves (made for async saves). Our saves are synchronous: the results
    reach this process itself, so an in-process queue serves, and no manager process exists to
    outlive a kill of the run. (megatron-core 0.16's module global; left alone if absent.)"""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(directory: str, iteration: int, chunks, optimizer, scheduler, args, cfg,
                    train_state: dict, plan: CheckpointPlan) -> str:
    rank = torch.distributed.get_rank()
    _in_process_write_results()
    target = iteration_dir(directory, iteration)
    try:
        if rank == 0:
            os.makedirs(directory, exist_ok=True)
            if os.path.isdir(target):
                # Not a checkpoint of another run (plan_checkpoints refused those): a save of this
                # iteration that a crash cut short, or one rolled back from. Never mix files.
                shutil.rmtree(target)
            os.makedirs(target)
            write_text_atomic(
                os.path.join(directory, MODEL_CONFIG_FILE),
                json.dumps(architecture_of(cfg), indent=2, sort_keys=True),
            )
            if _fault("ENOSPC", iteration):
                # A full disk, from the kernel: the first shard file is /dev/full.
                os.symlink("/dev/full", os.path.join(target, "__0_0.distcp"))
        torch.distributed.barrier()
        if _fault("KILL_IN_WRITE", iteration):
            # kill -9 of the run while its checkpoint writer processes run: the first one forked
            # does it.
            os.register_at_fork(after_in_child=lambda: os.kill(os.getppid(), signal.SIGKILL))
        state = _sharded_state(chunks, optimizer, is_loading=False, with_optimizer=True,
                               metadata=_optimizer_metadata(args))
        state["opt_param_scheduler"] = scheduler.state_dict()
        state["train_state"] = dict(train_state, iteration=iteration)
        state["layout"] = _layout(args)
        dist_checkpointing.save(state, target)
        if _fault("SIGTERM_IN_SAVE", iteration):  # a scheduler's stop request, between shards and pointer
            os.kill(os.getpid(), signal.SIGTERM)
        torch.save(rng_state(), os.path.join(target, f"rng_rank{rank:05d}.pt"))
        torch.distributed.barrier()
        _write_manifest(target, rank)
    except (Exception, CheckpointException) as err:  # re-raised unless the filesystem refused the save
        cause = _filesystem_error(err)
        if cause is None:
            raise
        shutil.rmtree(target, ignore_errors=True)  # never leave a partial save (it holds the space)
        previous = read_latest_iteration(directory) if os.path.isdir(directory) else None
        kept = (f"the previous checkpoint (iteration {previous}) is intact" if previous is not None
                else "there is no earlier checkpoint")
        fix = ("free space or raise the quota" if cause.errno in (errno.ENOSPC, errno.EDQUOT)
               else f"make {directory} writable")
        raise CheckpointSaveError(
            f"saving iteration {iteration} to {target} failed: {cause.strerror or cause} "
            f"({errno.errorcode.get(cause.errno, cause.errno)}). The partial save was removed; "
            f"{kept}. {fix.capitalize()}, then run again with --load {directory}") from err
    if _fault("BEFORE_LATEST", iteration):
        # Die after the shards and the manifest are written but before the pointer moves, as a
        # node lost mid-save would.
        os._exit(17)
    torch.distributed.barrier()
    plan.written.add(iteration)
    if rank == 0:
        write_text_atomic(os.path.join(directory, LATEST_FILE), str(iteration))
        _prune(directory, args.keep_last_checkpoints, iteration, plan)
    torch.distributed.barrier()
    return target


def _prune(directory: str, keep: Optional[int], latest: int, plan: CheckpointPlan) -> None:
    """Apply --keep-last-checkpoints to this run's own saves (and those of the run it continues in
    the same directory). Another run's checkpoints are never deleted, nor anything newer than
    ``latest``: the pointer may have been rolled back on purpose."""
    if keep is None or keep <= 0:
        return
    iters = saved_iterations(directory)
    ours = [i for i in iters if i <= latest and (i in plan.written or i <= plan.inherited)
            and is_complete_checkpoint(iteration_dir(directory, i))]
    for old in ours[:-keep]:
        shutil.rmtree(iteration_dir(directory, old), ignore_errors=True)
    if plan.continues_save_dir:
        # Saves of the continued run that a crash cut short (no dist_checkpointing metadata):
        # nothing can load them.
        for i in iters:
            if i < latest and i not in plan.written and not is_complete_checkpoint(iteration_dir(directory, i)):
                shutil.rmtree(iteration_dir(directory, i), ignore_errors=True)


def has_checkpoint(directory: Optional[str]) -> bool:
    return bool(directory) and os.path.isdir(directory) and read_latest_iteration(directory) is not None


# What reading a damaged checkpoint raises: torch.load (truncation, pickles refused by
# weights-only loading), dist_checkpointing and torch.distributed.checkpoint (missing or cut
# shards, broken metadata).
_READ_ERRORS = (OSError, EOFError, ValueError, RuntimeError, pickle.UnpicklingError, CheckpointingException,
                CheckpointException)


@contextmanager
def _reading(what: str, directory: str, iteration: int):
    """Report a checkpoint file that cannot be read as a CheckpointFormatError naming ``what``
    (a file or the iteration's shards) and the way back to an intact iteration."""
    try:
        yield
    except _READ_ERRORS as caught:
        err = _find_error(caught, pickle.UnpicklingError) or next(
            (e for e in _wrapped(caught) if isinstance(caught, CheckpointException)), caught)
        if isinstance(err, pickle.UnpicklingError):
            # torch's message advises weights_only=False, which would run the pickled code: never
            # repeat it. Name the global it refused instead.
            refused = re.search(r"GLOBAL (\S+)", str(err))
            problem = (f"{what} holds pickled Python objects{f' ({refused.group(1)})' if refused else ''}"
                       ", which the weights-only loader refused (nothing in it ran): the file was "
                       "not written by this trainer; it was tampered with or replaced")
        else:
            first = (str(err).strip().splitlines() or [""])[0][:300]
            if not first and isinstance(err, EOFError):
                first = "a file ends early"
            problem = f"{what} cannot be read ({type(err).__name__}{f': {first}' if first else ''})"
        raise CheckpointFormatError(f"iteration {iteration} is damaged: {problem}; "
                                    + damaged_checkpoint_advice(directory, iteration)) from None


def load_checkpoint(directory: str, chunks, optimizer, scheduler, args, cfg, log=print,
                    iteration: Optional[int] = None) -> dict:
    """Restore a training run; returns the saved train state (iteration, consumed samples, ...).
    ``iteration``: the one ``plan_checkpoints`` chose (default: the directory's latest)."""
    check_architecture(read_model_config(directory), cfg, directory)
    if iteration is None:
        iteration = read_latest_iteration(directory)
    target = iteration_dir(directory, iteration)
    with _reading(os.path.join(target, "common.pt"), directory, iteration):
        common = dist_checkpointing.load_common_state_dict(target)
    with_optim = not args.no_load_optim
    saved_layout = common.get("layout") or {}
    saved_train_only = saved_layout.get("train_only")  # absent in checkpoints of older versions
    if with_optim and saved_train_only is not None and saved_train_only != args.train_only:
        raise CheckpointFormatError(
            f"{target}: the optimizer state was saved with --train-only {saved_train_only} and this "
            f"run has --train-only {args.train_only}, so their optimizers hold different parameters; "
            f"pass --train-only {saved_train_only} to resume it, or --no-load-optim to load the "
            f"weights only (with a fresh optimizer); to start a new stage from its weights use "
            f"--init-from {directory} instead of --load"
        )
    saved_fade = saved_layout.get("rwkv_fade_in")
    ours_fade = _layout(args)["rwkv_fade_in"]
    if saved_fade and iteration < saved_fade[1] and saved_fade != ours_fade:
        start, end = saved_fade
        raise CheckpointFormatError(
            f"{target}: saved at iteration {iteration}, during --rwkv-fade-in {start} {end} (its RWKV-7 "
            f"blocks partly silenced), and this run has "
            f"{'--rwkv-fade-in ' + ' '.join(map(str, ours_fade)) if ours_fade else 'no --rwkv-fade-in'}; "
            f"pass --rwkv-fade-in {start} {end} to finish that schedule, or start a new stage from its "
            f"weights with --init-from {directory} instead of --load"
        )
    saved_dist_opt = saved_layout.get("distributed_optimizer")
    if with_optim and saved_dist_opt is not None and saved_dist_opt != bool(args.use_distributed_optimizer):
        raise CheckpointFormatError(
            f"{target}: the optimizer state was saved {'with' if saved_dist_opt else 'without'} "
            f"--use-distributed-optimizer and this run is {'with' if args.use_distributed_optimizer else 'without'} "
            "it; use the same setting, or --no-load-optim to load the weights only"
        )
    saved_type = (common.get("optimizer") or {}).get("param_state_sharding_type") if with_optim else None
    if (with_optim and saved_type == "dp_reshardable"
            and (saved_layout.get("tp"), saved_layout.get("pp"), saved_layout.get("vpp"))
            != (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                args.virtual_pipeline_model_parallel_size)):
        raise CheckpointFormatError(
            f"{target}: the distributed optimizer state was saved DP-reshardable at TP={saved_layout.get('tp')} "
            f"PP={saved_layout.get('pp')} (VPP={saved_layout.get('vpp')}) and cannot load at TP="
            f"{args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size} "
            f"(VPP={args.virtual_pipeline_model_parallel_size}); resume at the saved layout, load the "
            "weights only with --no-load-optim, or save with --dist-ckpt-optim-fully-reshardable"
        )
    if with_optim and saved_type == "fully_reshardable" and _torch_adam_distributed_optimizers(optimizer):
        raise CheckpointFormatError(
            f"{target}: the distributed optimizer state was saved fully reshardable, which "
            "megatron-core 0.16.1 cannot load into torch's Adam (no Transformer Engine or Apex "
            "here); install one of them, or load the weights only with --no-load-optim"
        )
    sharded = _sharded_state(chunks, optimizer, is_loading=True, with_optimizer=with_optim,
                             metadata=_optimizer_metadata(args, saved_type))
    with _reading(target, directory, iteration):
        loaded = dist_checkpointing.load(sharded, target)
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        chunk.module.load_state_dict(loaded[key], strict=True)
    if with_optim:
        with torch.no_grad():  # fp32 training: the optimizer's main params are views of the weights
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_torch_adam_step(optimizer)
        scheduler.load_state_dict(common["opt_param_scheduler"])
    same_layout = _same_parallel_layout(common.get("layout"), args)
    rng_file = os.path.join(target, f"rng_rank{torch.distributed.get_rank():05d}.pt")
    if not args.no_load_rng and same_layout and os.path.isfile(rng_file):
        with _reading(rng_file, directory, iteration):
            saved_rng = torch.load(rng_file, weights_only=True)
        set_rng_state(saved_rng)
    elif not same_layout:
        log(f"note: checkpoint layout {common.get('layout')} differs from this run's "
            f"{_layout(args)}; per-rank RNG states are not restored")
    return dict(common["train_state"])
