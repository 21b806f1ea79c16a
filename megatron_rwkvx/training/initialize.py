"""Process groups, devices and seeds for a training run (torchrun / srun environments)."""
from __future__ import annotations

import ctypes
import os
import random
import signal
import sys
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed


def _env_int(*names, default=None):
    for n in names:
        if n in os.environ:
            return int(os.environ[n])
    return default


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# The pid of the process whose children must end with it: spawned children (a fresh interpreter)
# learn it from the environment, since the parent may die before they arm the signal.
PARENT_PID_ENV = "MEGATRON_RWKVX_PARENT_PID"
_forks_end_with_parent = False


def end_with_parent(parent: Optional[int] = None) -> None:
    """Have the kernel SIGKILL this process when the process (strictly: the thread) that started it
    dies, kill -9 included: a helper of a run must not outlive it. ``parent``: its pid, to catch a
    parent that died before the signal was armed. Linux only (elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def forks_end_with_parent() -> None:
    """Every process this one forks from now on (dist_checkpointing's writer processes fork at each
    save) ends with it. Children multiprocessing spawns run ``megatron_rwkvx.pretrain`` as their
    main module, which arms the same signal (see there)."""
    global _forks_end_with_parent
    os.environ[PARENT_PID_ENV] = str(os.getpid())
    if _forks_end_with_parent:
        return
    _forks_end_with_parent = True
    os.register_at_fork(after_in_child=spawned_child)


def spawned_child() -> None:
    """In a process forked, or spawned by multiprocessing (see pretrain.py), for a run: end with
    it, and have the processes this one starts end with this one."""
    parent = os.environ.get(PARENT_PID_ENV, "")
    end_with_parent(int(parent) if parent.isdigit() else None)
    os.environ[PARENT_PID_ENV] = str(os.getpid())


def initialize_distributed(args) -> None:
    """Start torch.distributed (nccl on GPUs, gloo on the CPU) and megatron's parallel groups.

    Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK) and under ``srun`` with one task per GPU
    (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID plus MASTER_ADDR/MASTER_PORT from the launcher).
    """
    forks_end_with_parent()
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if args.device == "cpu":
        from megatron_rwkvx import cpu_runtime

        cpu_runtime.enable()
        backend = "gloo"
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was given but no GPU is visible; use --device cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "nccl"
    if not torch.distributed.is_initialized():
        # One process has nobody to meet: an in-process store needs no port, so two single-process
        # runs on one machine cannot collide on MASTER_PORT (29500 by default).
        store = torch.distributed.HashStore() if world == 1 else None
        torch.distributed.init_process_group(
            backend, rank=rank, world_size=world, timeout=timedelta(minutes=args.distributed_timeout_minutes), store=store
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
    )


def set_random_seed(seed: int) -> None:
    """Same seeds on every data-parallel replica, distinct per pipeline stage (as Megatron-LM)."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    # Only tensors and plain containers, so the file loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "random": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
