"""The trainer check in order: the loss comparison (small model: fp32 CPU vs the device, same
initial weights and batches), then the timed configurations of ``cases`` while the budget lasts;
then the JSON and the markdown table. On the GPU every configuration runs in its own process
(``tools/gpu_train_check.py --worker``): a clean allocator peak, an out-of-memory (or a stuck
kernel, --case-timeout-s) that ends only its own configuration, and a CPU reference that never
shares a process with the CUDA run (the CPU runtime shim patches torch.cuda for the whole process).
``--smoke`` has none of these to fear (all on the CPU, tiny): the fp32 reference still runs as a
child, beside the rest, which runs in this process one configuration after another (each process
start costs seconds of imports: the test's time)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch

from megatron_rwkvx.benchmarks.gpu_check.bench import Bench

from .cases import CPU, CPU_BF16, GPU, Case, Device, as_dict, case_argv, loss_check_shape, pretrain_argv, timed_cases

REPO = Path(__file__).resolve().parents[3]
COMMAND = REPO / "tools" / "gpu_train_check.py"
# The stdout lines of a run worth keeping: which kernels ran.
_BACKEND_PREFIXES = ("wkv7:", "sparse-attention:", "dense-attention:")
LOSS_CHECK_LR = 1e-4
TIMED_LR = 1e-4
FLOP_FORMULA = ("MFU = 3 x model_flops_per_token(cfg, T) x tokens/s / peak bf16 FLOP/s "
                "(training.metrics: every projection, the WKV-7 recurrence at 8 N^2 per head and "
                "token, attention scores and values over the keys each query attends: "
                "min(position, chunk x top-k) for sparse, position for dense; the head; "
                "multiply-add = 2 FLOPs; forward + backward = 3 x forward)")


def _recorded(bench: Bench, name: str, result: dict, text: str, start: float) -> dict:
    """A configuration's result with what its output tells (the kernels it ran; the tail when it
    failed) and its wall time; one progress line."""
    if result["status"] != "ok":
        result["output_tail"] = text[-3000:]
    result["backends"] = [ln for ln in text.splitlines() if ln.startswith(_BACKEND_PREFIXES)]
    result["wall_s"] = round(time.time() - start, 1)
    print(f"[{bench.elapsed():6.1f}s] {name}: {result['status']} ({result['wall_s']} s)", flush=True)
    return result


class _InProcess:
    """--smoke: one configuration in this process, run at once; ``result`` hands it over. No
    timeout, and the peak RSS is the process's so far (a smoke run checks paths, not figures)."""

    def __init__(self, bench: Bench, name: str, device: Device, argv: List[str], warmup: int, work: Path,
                 timeout: float, threads: Optional[int]):
        from .worker import recorded_case, tear_down

        os.environ.update(device.env)  # before anything starts CUDA here: see CPU
        if threads:
            torch.set_num_threads(threads)
        start, out = time.time(), io.StringIO()
        with contextlib.redirect_stdout(out):
            result = recorded_case(argv, warmup)
            tear_down()
        if "peak_kind" in result:
            result["peak_kind"] += ", of the smoke process so far"
        self._result = _recorded(bench, name, result, out.getvalue(), start)

    def result(self) -> dict:
        return self._result


class _Child:
    """One configuration in a child process (``tools/gpu_train_check.py --worker``), started at once;
    ``result`` waits for it."""

    def __init__(self, bench: Bench, name: str, device: Device, argv: List[str], warmup: int, work: Path,
                 timeout: float, threads: Optional[int]):
        self.bench, self.name, self.timeout = bench, name, timeout
        slug = "".join(c if c.isalnum() else "_" for c in name)
        spec, self.out = work / f"{slug}.spec.json", work / f"{slug}.result.json"
        spec.write_text(json.dumps({"argv": argv, "warmup": warmup}))
        self.out.unlink(missing_ok=True)
        env = dict(os.environ, **device.env, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        # Later configurations of the same shapes reuse the Triton kernels' autotune choices from
        # Triton's disk cache instead of benchmarking every tile set again in each process.
        env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
        self.start = time.time()
        self.proc = subprocess.Popen([sys.executable, str(COMMAND), "--worker", str(spec), str(self.out)],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)

    def result(self) -> dict:
        """Wait for it; its result, or why there is none."""
        try:
            text, _ = self.proc.communicate(timeout=self.timeout)
            code = self.proc.returncode
        except subprocess.TimeoutExpired:
            self.proc.kill()
            text, _ = self.proc.communicate()
            code = None
        if self.out.exists():
            result = json.loads(self.out.read_text())
        elif code is None:
            result = {"status": f"timeout: stopped after {self.timeout:.0f} s (--case-timeout-s)"}
        else:
            result = {"status": f"error: the process exited with status {code}"}
        return _recorded(self.bench, self.name, result, text, self.start)


def _runner(smoke: bool):
    """How the configurations other than the loss check's reference run (module docstring)."""
    return _InProcess if smoke else _Child


def _initial_weights(shape, work: Path) -> Path:
    """Random weights for every parameter (the sparse output projections too) in the official
    layout, with the pattern beside them: what both loss-check runs start from (--init-from)."""
    from megatron_rwkvx.checkpointing.megatron_format import architecture_of
    from megatron_rwkvx.checkpointing.official_format import REFERENCE_RWKVX
    from megatron_rwkvx.config import RWKVXConfig
    from megatron_rwkvx.pretrained import write_file_config
    from megatron_rwkvx.testing.checkpoints import random_official_state_dict

    cfg = RWKVXConfig(hidden_size=shape.width, head_size=shape.head_size, layer_pattern=shape.pattern,
                      vocab_size=shape.vocab, sparse_chunk_size=shape.chunk, sparse_top_k=shape.top_k)
    path = work / "loss_check_init.pth"
    torch.save(random_official_state_dict(cfg, seed=11, layout=REFERENCE_RWKVX), path)
    write_file_config(str(path), architecture_of(cfg))
    return path


def loss_check(args, bench: Bench, work: Path) -> dict:
    """The first steps' losses on the device (bf16) against the CPU in fp32: same weights, same
    batches (mock data of one seed), same optimizer settings."""
    shape = loss_check_shape(args.smoke)
    T = args.lengths[0] if args.smoke else 2048
    init = _initial_weights(shape, work)
    extra = ["--init-from", str(init), "--lr", str(LOSS_CHECK_LR), "--attention-mode", "sparse"]

    def argv(device):
        return pretrain_argv(shape, T, device, args.loss_steps, seed=5, extra=extra, with_shape=False)

    device = CPU_BF16 if args.smoke else GPU
    # Side by side: the reference keeps the CPU busy while the device run keeps the GPU busy
    # (--smoke: the other CPU core). The child starts first, so that an in-process run overlaps it.
    children = {
        "reference": _Child(bench, "loss check: fp32 CPU", CPU, argv(CPU), 0, work, args.case_timeout_s, args.threads),
        "device": _runner(args.smoke)(bench, f"loss check: {'bf16 CPU (smoke)' if args.smoke else 'bf16 GPU'}",
                                      device, argv(device), 0, work, args.case_timeout_s, args.threads),
    }
    runs = {k: child.result() for k, child in children.items()}
    out = {"shape": as_dict(shape), "T": T, "steps": args.loss_steps, "rtol": args.loss_rtol,
           "device_precision": "bf16", "device_type": device.device, **runs}
    if all(r["status"] == "ok" for r in runs.values()):
        ref, dev = runs["reference"]["losses"], runs["device"]["losses"]
        rel = [abs(d - r) / abs(r) for r, d in zip(ref, dev)]
        out.update(reference_losses=ref, device_losses=dev, relative_difference=rel,
                   passed=max(rel) <= args.loss_rtol)
    else:
        out["passed"] = False
    print(f"[{bench.elapsed():6.1f}s] loss check: {'PASS' if out['passed'] else 'FAIL'}", flush=True)
    return out


def _ratios(rows: List[dict]) -> None:
    """sparse/dense: tokens/s of a sparse row over the dense row of the same model, T and recompute."""
    dense = {(r["model"], r["T"], r["recompute"]): r for r in rows if r["attention"] == "dense"}
    for r in rows:
        d = dense.get((r["model"], r["T"], r["recompute"]))
        if r["attention"] == "sparse" and d and r.get("tokens_per_s") and d.get("tokens_per_s"):
            r["sparse_over_dense"] = r["tokens_per_s"] / d["tokens_per_s"]


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(rows: List[dict]) -> str:
    lines = ["| model | T | attention | recompute | status | s/step | tokens/s | MFU | peak GiB | "
             "planner GiB | planner / peak | sparse / dense |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        timed = [s for s in r.get("step_s", [])[-r.get("timed_steps", 0):]] if r.get("timed_steps") else []
        s_step = sum(timed) / len(timed) if timed else None
        planner = (r.get("planner") or {}).get("total_gib")
        ratio = planner / r["peak_gib"] if planner and r.get("peak_gib") else None
        lines.append(
            f"| {r['model']} | {r['T']:,} | {r['attention']} | {r['recompute']} | {r['status'][:40]} | "
            f"{_fmt(s_step, '.3f')} | {_fmt(r.get('tokens_per_s'), ',.0f')} | "
            f"{_fmt(None if r.get('mfu') is None else 100 * r['mfu'], '.1f')}{'%' if r.get('mfu') is not None else ''} | "
            f"{_fmt(r.get('peak_gib'), '.3g')} | {_fmt(planner, '.3g')} | {_fmt(ratio, '.3g')} | "
            f"{_fmt(r.get('sparse_over_dense'), '.2f')}{'x' if r.get('sparse_over_dense') else ''} |")
    return "\n".join(lines)


def loss_table(check: dict) -> str:
    if "reference_losses" not in check:
        return (f"loss check: FAIL (reference {check['reference']['status']}; "
                f"device {check['device']['status']})")
    lines = [f"loss check (bf16 on {check['device_type']} vs fp32 on cpu, same weights and batches, "
             f"rtol {check['rtol']:g}): {'PASS' if check['passed'] else 'FAIL'}",
             "| step | fp32 CPU | bf16 | relative difference |", "|---:|---:|---:|---:|"]
    for i, (r, d, e) in enumerate(zip(check["reference_losses"], check["device_losses"],
                                      check["relative_difference"]), 1):
        lines.append(f"| {i} | {r:.5f} | {d:.5f} | {e:.2e} |")
    return "\n".join(lines)


def _meta(args, bench: Bench) -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": "smoke" if args.smoke else "gpu",
            "device": torch.cuda.get_device_name() if not args.smoke and torch.cuda.is_available()
            else f"CPU ({platform.processor() or 'unknown'})",
            "torch": torch.__version__, "python": platform.python_version(),
            "budget_s": args.budget_s, "steps": args.steps, "warmup": args.warmup,
            "flop_formula": FLOP_FORMULA}


def run(args) -> int:
    """Exit status 1 when the loss check failed, else 0 (a configuration that fails or runs out of
    memory is recorded in the table and the JSON)."""
    if args.smoke:  # this process trains too (_InProcess): it must never see the GPU (see CPU)
        os.environ.update(CPU.env)
    bench = Bench(smoke=args.smoke)
    meta = _meta(args, bench)
    print(f"gpu_train_check: {meta['mode']} on {meta['device']}, budget {args.budget_s:g} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        check = loss_check(args, bench, work)
        device = CPU if args.smoke else GPU
        extra = ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        rows, skipped = [], []
        for case in timed_cases(args.lengths, args.wide_width, args.smoke):
            if bench.elapsed() > args.budget_s:
                skipped.append(case.name)
                rows.append({**case.record(), "status": bench.skipped(args.budget_s)})
                continue
            argv = case_argv(case, device, args.steps, seed=1234, lr=TIMED_LR, extra=extra)
            child = _runner(args.smoke)(bench, case.name, device, argv, args.warmup, work, args.case_timeout_s,
                                        args.threads)
            rows.append({**case.record(), **child.result()})
    _ratios(rows)
    meta["total_s"] = round(bench.elapsed(), 1)
    results = {"meta": meta, "loss_check": check, "cases": rows, "skipped": skipped}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1, default=str))
    print()
    print(f"device: {meta['device']} | torch {meta['torch']} | {meta['date']} | {meta['total_s']} s")
    print(loss_table(check))
    print()
    print(table(rows))
    print(f"\n{FLOP_FORMULA}; peak GiB: {'peak RSS of the smoke process so far (CPU)' if args.smoke else 'torch.cuda.max_memory_allocated'}; "
          "planner: parallel.memory_model.estimate at one GPU (weights, gradients, Adam state, activations, logits)")
    if skipped:
        print(f"skipped (--budget-s {args.budget_s:g} spent): " + "; ".join(skipped))
    return 0 if check["passed"] else 1
