"""Run a function in N gloo processes on the CPU and report every rank's failure clearly.

Used by the multi-rank tests (pytest marker ``distributed``) and by tools that check layouts on a
laptop. Each process initialises ``torch.distributed`` with gloo on 127.0.0.1 and switches on the
CPU runtime shim (:mod:`megatron_rwkvx.cpu_runtime`) before calling the body.
"""
from __future__ import annotations

import os
import pickle
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable, List, Optional

import torch
import torch.multiprocessing as mp


class DistributedTestFailure(AssertionError):
    """One or more ranks failed; the message holds each failing rank's traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # Tests are tiny; one thread per rank keeps N processes from fighting over two cores.
    torch.set_num_threads(1)
    try:
        from megatron_rwkvx import cpu_runtime

        cpu_runtime.enable()
        torch.distributed.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            init_method=f"tcp://127.0.0.1:{port}",
            timeout=timedelta(seconds=120),
        )
        result = fn(rank, world_size, *args)
        try:
            payload = pickle.dumps(result)
        except Exception:  # an unpicklable result is the test body's bug, not a failure to hide
            payload = pickle.dumps(repr(result))
        queue.put((rank, True, payload))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600.0
) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return each rank's result.

    ``fn`` must be importable by name (a module-level function) because the processes are
    spawned. Raises :class:`DistributedTestFailure` naming every rank that raised, with its
    traceback, or the ranks that did not finish within ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, queue), daemon=False)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict = {}
    failures: dict = {}
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(failures) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            rank, ok, payload = queue.get(timeout=min(remaining, 1.0))
        except queue_mod.Empty:
            dead = [
                i for i, p in enumerate(procs)
                if not p.is_alive() and i not in results and i not in failures
            ]
            # A process that died without reporting (segfault, os._exit) is a failure too; give
            # the queue a moment in case its report is still in flight.
            if dead:
                try:
                    rank, ok, payload = queue.get(timeout=2.0)
                except queue_mod.Empty:
                    for i in dead:
                        failures[i] = f"process exited with code {procs[i].exitcode} without a report"
                    continue
            else:
                continue
        if ok:
            results[rank] = pickle.loads(payload)
        else:
            failures[rank] = payload
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    missing = [r for r in range(world_size) if r not in results and r not in failures]
    if failures or missing:
        parts = [f"--- rank {r} failed ---\n{failures[r]}" for r in sorted(failures)]
        if missing:
            parts.append(f"--- ranks {missing} did not finish within {timeout:.0f}s ---")
        raise DistributedTestFailure(
            f"{len(failures) + len(missing)} of {world_size} ranks failed:\n" + "\n".join(parts)
        )
    return [results[r] for r in range(world_size)]


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    seed: int = 1234,
) -> None:
    """Set up megatron-core's process groups and RNG tracker inside a test body."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
