"""What every section of the GPU check shares: the device and dtype, the clock and time budget,
inputs, timing of a forward+backward step, and how failures are recorded."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from megatron_rwkvx.kernels.wkv7.probe import model_like_inputs


class Unavailable(Exception):
    """A comparison that cannot run here (e.g. fla not installed): reported, not an error."""


@dataclass
class Bench:
    """The run's device, dtype and clock. ``smoke``: the tiny CPU run through Triton's interpreter."""

    smoke: bool
    quick: bool = False
    start: float = field(default_factory=time.time)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.smoke else "cuda")

    @property
    def dtype(self) -> torch.dtype:
        # bf16 is the training dtype; the interpreter can only run fp32/fp16 dots.
        return torch.float32 if self.smoke else torch.bfloat16

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def elapsed(self) -> float:
        return time.time() - self.start

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()

    def randn(self, *shape, seed: int, scale: float = 1.0) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn(*shape, generator=gen, device=self.device) * scale

    def wkv_inputs(self, B, T, H, N, dtype, seed=0):
        """Model-like WKV inputs (``kernels/wkv7/probe.py``): a = -kk, b = kk * rate, |kk| = 1."""
        return model_like_inputs(B, T, H, N, dtype=dtype, device=self.device, seed=seed)

    def time_fwd_bwd(self, step, warmup: int, reps: int) -> float:
        """Median milliseconds of ``step()`` (one forward+backward) after ``warmup`` calls."""
        for _ in range(warmup):
            step()
        self.sync()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def reps(self, cfg: dict, T: int) -> int:
        """Fewer repetitions from 32K tokens on: each takes long enough to time alone."""
        return cfg["reps"] if T <= 16384 else max(1, cfg["reps"] - 2)

    def skipped(self, budget_s: float) -> str:
        return f"skipped: time budget ({budget_s:.0f} s) spent"


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


def error_status(exc: BaseException) -> str:
    return "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc)[:300]}"


def grad_step(fn, inputs, params=()):
    """A closure running fn(*inputs) forward and backward into ``inputs`` and ``params``;
    ``step.forward()`` runs the forward pass alone (autograd recording on, output dropped)."""
    leaves = list(inputs) + list(params)

    def step():
        out = fn(*inputs)
        if isinstance(out, tuple):
            out = out[0]
        torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)

    def forward():
        fn(*inputs)

    step.forward = forward
    return step
