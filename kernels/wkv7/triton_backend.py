"""The ``triton`` backend of ``wkv7``: chunked RWKV-7 recurrence in Triton, forward and backward.

Importing this module registers the backend (the registry imports it on first need).
It runs on CUDA tensors, and on CPU tensors only under ``TRITON_INTERPRET=1`` (the tests).

Launches: forward = ``prep`` + ``fwd_scan``; backward = ``prep`` (recomputed, now also keeping
the chunk's pair matrices) + ``bwd_scans`` (the state pass recomputed, storing the state entering
each chunk, side by side with the state-gradient pass) + ``bwd_chunk``. Saved for backward: the
inputs and the initial state only. Transient in the backward pass: two fp32 states per chunk
(states and their gradients, ``2*N*N/L`` floats per token and head) and about six fp32
``[B*H, T, N]`` buffers.

Precision: all arithmetic is fp32; matrix products use ``ieee`` fp32 for fp32 inputs and TF32 for
fp16/bf16 inputs (TF32 keeps 10 mantissa bits, more than bf16 inputs carry).

Pair matrices (``pair_mode``): ``factored`` forms them with tensor-core products of decay-scaled
tiles, ``exact`` with a per-column loop that is safe for any ``w <= 0`` (see ``triton_kernels``);
``auto`` (default) takes ``factored`` whenever the largest per-token decay keeps every scale
factor below ``e^FACTOR_EXPONENT_LIMIT`` (``checks.py``), which RWKV-7's decay always does.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton

from ..triton_launch import INTERPRETED as _INTERPRET
from ..triton_launch import autotuned, launch
from . import triton_kernels as K
from .checks import FACTOR_EXPONENT_LIMIT, factored_pairs_fit, log_decay_min
from .dispatch import register_backend

DEFAULT_CHUNK_SIZE = 16
SUPPORTED_CHUNK_SIZES = (16, 32, 64)
MAX_HEAD_SIZE = 128
PAIR_MODES = ("auto", "factored", "exact")

# Small autotune sets: the scans' value-row block trades parallelism (B*H*N/BV programs) against
# reloading the shared per-chunk tiles, and their software pipelining (num_stages 3) against
# registers: compiled for sm_90 (``triton_compile_check``), the pipelined scans sit at 240-255
# registers and spill at L=32, the unpipelined ones (num_stages 1) stay at 150-250 without spills;
# which is faster is for the autotuner to measure. The chunk kernels only vary the warp count.
_SCAN_CONFIGS = [
    triton.Config({"BV": 16}, num_warps=4, num_stages=1),
    triton.Config({"BV": 32}, num_warps=4, num_stages=1),
    triton.Config({"BV": 64}, num_warps=8, num_stages=1),
    triton.Config({"BV": 32}, num_warps=4, num_stages=3),
]
_CHUNK_CONFIGS = [triton.Config({}, num_warps=4), triton.Config({}, num_warps=8)]


def _prune_scan(configs, named_args, **kwargs):
    block_n = kwargs.get("BN", named_args.get("BN"))
    kept = [c for c in configs if c.kwargs["BV"] <= block_n]
    return kept or configs[:1]


_prep_tuned = autotuned(K._wkv7_prep_kernel, _CHUNK_CONFIGS, ["BN", "L", "WITH_Y", "STORE_A", "FACTORED"])
_fwd_scan_tuned = autotuned(K._wkv7_fwd_scan_kernel, _SCAN_CONFIGS, ["BN", "L", "BH"], _prune_scan)
_bwd_scans_tuned = autotuned(K._wkv7_bwd_scans_kernel, _SCAN_CONFIGS, ["BN", "L", "BH"], _prune_scan)
_bwd_chunk_tuned = autotuned(K._wkv7_bwd_chunk_kernel, _CHUNK_CONFIGS, ["BN", "L", "FACTORED"])
# Without autotuning (interpreter, RWKVX_TRITON_AUTOTUNE=0): an unspilled middle of each set.
_CHUNK_FIXED = _CHUNK_CONFIGS[0]


def _scan_fixed(block_n: int) -> triton.Config:
    return triton.Config({"BV": min(32, block_n)}, num_warps=4, num_stages=1)


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_n(N: int) -> int:
    return max(16, triton.next_power_of_2(N))


def _scan_grid(BH, N, passes=1):
    return lambda meta: (BH, triton.cdiv(N, meta["BV"]), passes)


def _prep(r, w, k, v, a, b, L, NT, backward, factored):
    """Intra-chunk buffers (see ``triton_kernels``): the forward pass needs ``yloc``, the backward
    pass the pair matrices ``amat``."""
    B, T, H, N = r.shape
    BH = B * H
    f32 = dict(device=r.device, dtype=torch.float32)
    bufs = {name: torch.empty(BH, NT * L, N, **f32) for name in ("q", "rp", "bhat", "khat", "p")}
    bufs["dec"] = torch.empty(BH, NT, N, **f32)
    if backward:
        bufs["amat"] = torch.empty(BH, NT, 4, L, L, **f32)
    else:
        bufs["yloc"] = torch.empty(BH, NT * L, N, **f32)
    unwritten = bufs["q"]
    args = (r, w, k, v, a, b, bufs["q"], bufs["rp"], bufs["bhat"], bufs["dec"], bufs["p"],
            bufs["khat"], bufs.get("yloc", unwritten), bufs.get("amat", unwritten), T, H, N, NT)
    launch(_prep_tuned, K._wkv7_prep_kernel, (NT, BH), args, _CHUNK_FIXED, L=L, BN=_block_n(N),
            WITH_Y=not backward, STORE_A=backward, PREC=_precision(r.dtype), FACTORED=factored)
    return bufs


def _forward(r, w, k, v, a, b, initial_state, L, factored):
    B, T, H, N = r.shape
    BH, NT = B * H, triton.cdiv(T, L)
    bufs = _prep(r, w, k, v, a, b, L, NT, backward=False, factored=factored)
    y = torch.empty_like(r)
    final = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
    s0 = initial_state if initial_state is not None else final  # unread without HAS_INIT
    args = (v, y, bufs["q"], bufs["rp"], bufs["bhat"], bufs["khat"], bufs["p"], bufs["yloc"],
            bufs["dec"], s0, final, T, H, N, NT, BH)
    launch(_fwd_scan_tuned, K._wkv7_fwd_scan_kernel, _scan_grid(BH, N), args, _scan_fixed(_block_n(N)),
            L=L, BN=_block_n(N), HAS_INIT=initial_state is not None, PREC=_precision(r.dtype))
    return y, final


def _backward(r, w, k, v, a, b, initial_state, dy, dfinal, L, factored):
    B, T, H, N = r.shape
    BH, NT, BN = B * H, triton.cdiv(T, L), _block_n(N)
    prec = _precision(r.dtype)
    bufs = _prep(r, w, k, v, a, b, L, NT, backward=True, factored=factored)
    # Chunk-entry states are recomputed rather than saved by the forward pass: N*N/L floats per
    # token and head would outweigh the inputs several times over at long context.
    states = torch.empty(BH, NT, N, N, device=r.device, dtype=torch.float32)
    dstates = torch.empty_like(states)
    final = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
    dinit = torch.empty_like(final)
    s0 = initial_state if initial_state is not None else final  # unread without HAS_INIT
    dsT = dfinal if dfinal is not None else dinit  # unread without HAS_DFINAL
    args = (v, dy, bufs["q"], bufs["rp"], bufs["bhat"], bufs["khat"], bufs["p"], bufs["dec"],
            s0, states, final, dsT, dstates, dinit, T, H, N, NT, BH)
    launch(_bwd_scans_tuned, K._wkv7_bwd_scans_kernel, _scan_grid(BH, N, passes=2), args, _scan_fixed(BN),
            L=L, BN=BN, HAS_INIT=initial_state is not None, HAS_DFINAL=dfinal is not None,
            PREC=prec)
    amat = bufs.pop("amat")
    del bufs
    grads = [torch.empty_like(r) for _ in range(6)]
    args = (r, w, k, v, a, b, dy, amat, states, dstates, *grads, T, H, N, NT)
    launch(_bwd_chunk_tuned, K._wkv7_bwd_chunk_kernel, (NT, BH), args, _CHUNK_FIXED, L=L, BN=BN, PREC=prec,
            FACTORED=factored)
    return grads, dinit


class _WKV7Triton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, initial_state, chunk, factored):
        with _device_ctx(r):
            y, final = _forward(r, w, k, v, a, b, initial_state, chunk, factored)
        ctx.save_for_backward(r, w, k, v, a, b, initial_state)
        ctx.chunk, ctx.factored = chunk, factored
        # Unused outputs then arrive as None, and the kernels skip them instead of reading zeros.
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dfinal):
        r, w, k, v, a, b, initial_state = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.to(r.dtype).contiguous()
        if dfinal is not None:
            dfinal = dfinal.float().contiguous()
        with _device_ctx(r):
            grads, dinit = _backward(r, w, k, v, a, b, initial_state, dy, dfinal, ctx.chunk, ctx.factored)
        return (*grads, dinit if initial_state is not None else None, None, None)


def _check(r: torch.Tensor, w: torch.Tensor, chunk_size: Optional[int], pair_mode: str) -> Tuple[int, bool]:
    """(chunk length, whether the pair matrices are factored)."""
    chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or chunk not in SUPPORTED_CHUNK_SIZES:
        raise ValueError(
            f"wkv7 (triton): chunk_size must be one of {SUPPORTED_CHUNK_SIZES} (or None for "
            f"{DEFAULT_CHUNK_SIZE}), got {chunk_size!r}"
        )
    if pair_mode not in PAIR_MODES:
        raise ValueError(f"wkv7 (triton): pair_mode must be one of {PAIR_MODES}, got {pair_mode!r}")
    N = r.shape[-1]
    if N > MAX_HEAD_SIZE:
        raise ValueError(
            f"wkv7 (triton): head size {N} is larger than {MAX_HEAD_SIZE} (a chunk's state must "
            "fit on one SM); use backend='chunked' or smaller heads"
        )
    if not (r.is_cuda or _INTERPRET):
        raise RuntimeError(
            f"wkv7 (triton): inputs are on {r.device}; the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is imported, for tests)"
        )
    # The kernels' numerical safety rests on w <= 0 (every exponent of the exact path is then
    # <= 0), the factored path on a bounded -w: one read of w checks both.
    w_min = log_decay_min(w, "triton")
    if w_min is None:
        return chunk, pair_mode != "exact"
    fits = factored_pairs_fit(chunk, w_min)
    if pair_mode == "factored" and not fits:
        raise ValueError(
            f"wkv7 (triton): pair_mode='factored' needs chunk_size * max|w| <= "
            f"{FACTOR_EXPONENT_LIMIT:g}, got {chunk} * {-w_min:.4g}; use pair_mode='auto' or "
            "'exact', or a smaller chunk_size"
        )
    return chunk, pair_mode == "factored" or (pair_mode == "auto" and fits)


def wkv7_triton(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    pair_mode: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton RWKV-7 recurrence (the ``wkv7`` contract): y in the input dtype, final state fp32.

    ``chunk_size``: 16 (default), 32 or 64 tokens per chunk; larger chunks shorten the sequential
    passes and shrink the backward pass's per-chunk states, but the intra-chunk work per token
    grows with the chunk. ``pair_mode``: ``auto``, ``factored`` or ``exact`` (module docstring).
    """
    chunk, factored = _check(r, w, chunk_size, pair_mode)
    B, T, H, N = r.shape
    if B * T * H == 0:  # nothing to launch; the state passes through unchanged
        if initial_state is None:
            return r.new_empty(r.shape), r.new_zeros(B, H, N, N, dtype=torch.float32)
        return r.new_empty(r.shape), initial_state.clone()
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    return _WKV7Triton.apply(r, w, k, v, a, b, initial_state, chunk, factored)


def _available(r: torch.Tensor) -> bool:
    return r.is_cuda or (_INTERPRET and r.device.type == "cpu")


# ``auto`` takes it on CUDA only: under the interpreter it is a test path, far slower than torch.
register_backend("triton", wkv7_triton, _available, auto=lambda r: r.is_cuda)
