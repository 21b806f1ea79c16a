#!/usr/bin/env python
"""Measured activation memory: the bytes autograd keeps for the backward pass, per block and per
token, for RWKV-7 (``R``) and sparse-attention (``A``) blocks, with and without each recompute
mode, at several T and parallel layouts.

Counting is device-independent (``megatron_rwkvx.testing.saved_activations``: saved-tensor hooks,
unique storages, parameters left out), so the CPU gives the figures a GPU run would keep, for the
operator backend that ran: ``torch`` (the CPU backends: chunked WKV-7, torch sparse attention) or
``triton`` (the GPU kernels, run in Triton's interpreter with fp16 standing in for bf16: same
sizes). Each layout runs in its own gloo processes; a rank's figure is the largest over ranks.

The ``fit`` part measures each block at a reference shape and at one changed dimension each
(ChannelMix width F, LoRA widths, tensor parallelism with and without sequence parallelism) and
solves for the per-token coefficients that ``megatron_rwkvx.parallel.memory_model`` holds:

  bytes/token = rep_C * C + lora * (LoRA widths) + (split_C * C + ffn * F) / tp
                [+ no_sp_C * C * (1 - 1/tp) without sequence parallelism]

    python tools/bench_activation_memory.py --backends torch --out docs/benchmarks/activation_memory.json
    TRITON_INTERPRET=1 python tools/bench_activation_memory.py --backends triton --width 128 --seq 256
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Dict, List

import torch

from megatron_rwkvx.testing.distributed import initialize_parallel, run_distributed

MODES = {
    "none": dict(),
    "selective": dict(recompute_granularity="selective"),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}
LAYOUTS = {
    "single": dict(tp=1, cp=1, sp=False),
    "tp2-sp": dict(tp=2, cp=1, sp=True),
    "tp2": dict(tp=2, cp=1, sp=False),
    "cp2": dict(tp=1, cp=2, sp=False),
}
# The measured block follows an R block, so an R block mixes in v_first as every later one does.
PATTERN = {"R": "RR", "A": "RA"}


def lora_kwargs(width: int) -> Dict[str, int]:
    return {f"{k}_lora_dim": width for k in ("decay", "a", "v", "gate")}


def _block_bytes(rank, world, layout, shapes, dtype_name):
    """Bytes per token (of the whole sequence) each shape's block keeps on this rank."""
    from megatron.core import parallel_state

    from megatron_rwkvx.config import RWKVXConfig
    from megatron_rwkvx.models.recompute import run_layers
    from megatron_rwkvx.models.rwkvx_model import RWKVXModel
    from megatron_rwkvx.testing.saved_activations import SavedActivationCounter

    tp, cp, sp = layout["tp"], layout["cp"], layout["sp"]
    initialize_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    dtype = getattr(torch, dtype_name)
    out = []
    for shape in shapes:
        c, t = shape["C"], shape["T"]
        cfg = RWKVXConfig(
            hidden_size=c, ffn_hidden_size=shape["F"], layer_pattern=PATTERN[shape["kind"]],
            vocab_size=256, sparse_chunk_size=shape["chunk"], sparse_top_k=3,
            tensor_model_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sp,
            params_dtype=dtype, use_cpu_initialization=True, wkv_backend=shape["wkv"],
            sparse_attention_backend=shape["sparse"], **lora_kwargs(shape["lora"]),
            **MODES[shape["mode"]],
        )
        model = RWKVXModel(cfg, pre_process=False, post_process=False)
        local = t // cp
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(local // tp if sp else local, 1, c, generator=g).to(dtype).requires_grad_()
        v_first = torch.randn(local, 1, c // tp, generator=g).to(dtype).requires_grad_()
        # v_first is one tensor for the whole stack: the memory model counts it once per stage.
        counter = SavedActivationCounter(list(model.parameters()) + [v_first])
        with counter:
            h, v = run_layers(model.decoder.layers[1:], hidden, v_first, cfg)
        (h.float().square().sum() + v.float().sum()).backward()  # the graph is usable
        out.append(dict(shape, layout=layout["name"], bytes_per_token=counter.bytes / t))
        del model, h, v, counter
    parallel_state.destroy_model_parallel()
    return out


def measure(layout_name: str, shapes: List[dict], dtype_name: str) -> List[dict]:
    layout = dict(LAYOUTS[layout_name], name=layout_name)
    world = layout["tp"] * layout["cp"]
    per_rank = run_distributed(_block_bytes, world, layout, shapes, dtype_name)
    return [max(rows, key=lambda r: r["bytes_per_token"]) for rows in zip(*per_rank)]


def backend_shape(backend: str) -> dict:
    if backend == "triton":
        return dict(wkv="triton", sparse="triton")
    return dict(wkv="chunked", sparse="torch")


def fit(backend: str, width: int, seq: int, chunk: int, dtype_name: str) -> Dict[str, dict]:
    """Per-token coefficients of each (block, mode) from five measurements (see the docstring)."""
    lora = 32 if width <= 256 else 64
    base = dict(C=width, F=4 * width, lora=lora, T=seq, chunk=chunk, **backend_shape(backend))
    variants = {"base": {}, "ffn": dict(F=2 * width), "lora": dict(lora=2 * lora)}
    shapes = [dict(base, kind=k, mode=m, **variants[v], variant=v)
              for v in variants for k in PATTERN for m in MODES]
    tp_shapes = [s for s in shapes if s["variant"] == "base"]
    rows = measure("single", shapes, dtype_name)
    rows += measure("tp2-sp", tp_shapes, dtype_name)
    rows += measure("tp2", tp_shapes, dtype_name)

    def get(kind, mode, variant, layout):
        return next(r["bytes_per_token"] for r in rows if r["kind"] == kind and r["mode"] == mode
                    and r["variant"] == variant and r["layout"] == layout)

    coeffs = {}
    for kind in PATTERN:
        for mode in MODES:
            m1 = get(kind, mode, "base", "single")
            ffn = (m1 - get(kind, mode, "ffn", "single")) / (base["F"] - 2 * width)
            per_lora = (get(kind, mode, "lora", "single") - m1) / (4 * lora)
            m_sp = get(kind, mode, "base", "tp2-sp")
            split = 2 * (m1 - m_sp)  # the part that halves at tp=2 (with SP)
            split_c = (split - ffn * base["F"]) / width
            rep_c = (m1 - split - per_lora * 4 * lora) / width
            no_sp_c = 2 * (get(kind, mode, "base", "tp2") - m_sp) / width
            coeffs[f"{kind}/{mode}"] = dict(rep_C=round(rep_c, 3), split_C=round(split_c, 3),
                                            ffn=round(ffn, 3), lora=round(per_lora, 3),
                                            no_sp_C=round(no_sp_c, 3))
    return dict(coefficients=coeffs, rows=rows, reference=base)


def sweep(backend: str, width: int, seqs: List[int], chunk: int, dtype_name: str) -> List[dict]:
    """Bytes per token at several T and layouts (single and CP2), for the table."""
    lora = 32 if width <= 256 else 64
    shapes = [dict(C=width, F=4 * width, lora=lora, T=t, chunk=chunk, kind=k, mode=m,
                   variant="sweep", **backend_shape(backend))
              for t in seqs for k in PATTERN for m in MODES]
    return measure("single", shapes, dtype_name) + measure("cp2", shapes, dtype_name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", nargs="+", default=["torch"], choices=["torch", "triton"])
    p.add_argument("--width", type=int, default=256, help="model width C of the fit")
    p.add_argument("--seq", type=int, default=1024, help="sequence length of the fit")
    p.add_argument("--sweep-seqs", type=int, nargs="*", default=[1024, 4096, 16384],
                   help="sequence lengths of the per-T table (empty: no sweep)")
    p.add_argument("--sweep-width", type=int, default=768)
    p.add_argument("--chunk", type=int, default=256, help="sparse chunk size (T multiple of 2x)")
    p.add_argument("--dtype", default=None, help="default bfloat16 (torch), float16 (triton)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}"}
    for backend in args.backends:
        dtype = args.dtype or ("float16" if backend == "triton" else "bfloat16")
        entry = fit(backend, args.width, args.seq, args.chunk, dtype)
        entry["dtype"] = dtype
        if args.sweep_seqs:
            entry["sweep"] = sweep(backend, args.sweep_width, args.sweep_seqs, args.chunk, dtype)
        result[backend] = entry
        print(f"backend {backend} ({dtype}): bytes per token per block, fitted at C={args.width}, "
              f"T={args.seq}")
        for key, c in entry["coefficients"].items():
            print(f"  {key:12s} {c}")
        for row in entry.get("sweep", []):
            print(f"  {row['layout']:6s} T={row['T']:>6} {row['kind']} {row['mode']:9s} "
                  f"{row['bytes_per_token'] / row['C']:8.2f} bytes/token/C")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
