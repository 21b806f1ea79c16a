"""What Megatron-LM's loop does around each iteration, outside the step's math: the profiler
window (--profile), manual garbage collection (--manual-gc) and, with --overlap-param-gather, the
parameter all-gather hooks that must be off while evaluating or saving.

The loop calls ``before_iteration``/``after_iteration`` with the iteration about to run / just
run (1-based, as logged), wraps evaluation and saves in ``outside_training``, and calls
``close`` once at the end.
"""
from __future__ import annotations

import contextlib
import gc
import os

import torch


class IterationHooks:
    def __init__(self, args, ddp_chunks, rank: int, log):
        self.args = args
        self.ddp_chunks = ddp_chunks
        self.log = log
        self.profiling = args.profile and rank in args.profile_ranks
        self.profiler = None
        self.cuda_range_open = False
        self.param_gather_hooks = any(getattr(m, "use_forward_hook", False) for m in ddp_chunks)
        if args.manual_gc:
            # Collections then happen on every rank at the same iteration, not whenever one
            # rank's allocator decides: a rank collecting alone stalls the others at the next
            # collective (Megatron-LM's reason for the flag).
            gc.disable()
            gc.collect()

    def before_iteration(self, iteration: int) -> None:
        if self.profiling and iteration == self.args.profile_step_start + 1:
            self._start_profiler()

    def after_iteration(self, iteration: int) -> None:
        if self.profiler is not None:
            self.profiler.step()
        if self.profiling and iteration == self.args.profile_step_end:
            self._stop_profiler()
        if self.args.manual_gc and self.args.manual_gc_interval and iteration % self.args.manual_gc_interval == 0:
            gc.collect()

    @contextlib.contextmanager
    def outside_training(self):
        """Evaluation and saves: parameters must be complete (an overlapped all-gather may still
        be pending) and the pre-forward hooks must not start the next one."""
        if self.param_gather_hooks:
            for m in self.ddp_chunks:
                m.disable_forward_pre_hook(param_sync=True)
        if self.args.manual_gc and self.args.manual_gc_eval:
            gc.collect()
        try:
            yield
        finally:
            if self.args.manual_gc and self.args.manual_gc_eval:
                gc.collect()
            if self.param_gather_hooks:
                for m in self.ddp_chunks:
                    m.enable_forward_pre_hook()

    def close(self) -> None:
        self._stop_profiler()
        if self.param_gather_hooks:
            for m in self.ddp_chunks:
                m.disable_forward_pre_hook(param_sync=True)
            self.param_gather_hooks = False
        if self.args.manual_gc:
            gc.enable()

    def _start_profiler(self) -> None:
        args = self.args
        if args.use_pytorch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if args.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            os.makedirs(args.tensorboard_dir, exist_ok=True)
            self.profiler = torch.profiler.profile(
                activities=activities,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(args.tensorboard_dir),
                record_shapes=True,
                with_stack=False,
            )
            self.profiler.start()
        else:
            torch.cuda.cudart().cudaProfilerStart()
            self.cuda_range_open = True
        self.log(f"profiling iterations {args.profile_step_start + 1} to {args.profile_step_end}")

    def _stop_profiler(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
            self.log(f"profiler trace written to {self.args.tensorboard_dir}")
        if self.cuda_range_open:
            torch.cuda.cudart().cudaProfilerStop()
            self.cuda_range_open = False
