#!/usr/bin/env python
"""A tiny RWKV-X stage-2 run at 64K tokens on the CPU, for real: the trainer on two processes with
context parallelism (gloo), with and without recompute, and one LongCE step; the table of
s/iteration and peak RSS per rank, at several lengths so that anything T x T would show.

  python tools/run_64k_cpu.py                       # 16K, 32K, 64K; none/full/selective; LongCE at 64K
  python tools/run_64k_cpu.py --lengths 65536 --recompute full
  python tools/run_64k_cpu.py --lengths 512 --iters 2 --chunk 64 --longce-window 256 --longce-stride 128

The data is made here (the sample corpus as bytes, packed into --lengths' longest sequences by
tools/preprocess_data.py with the 257-id ByteTokenizer, so the fp32 vocabulary softmax stays small).
Peak RSS is each rank's VmHWM from /proc, read until it exits. The machine may be shared: the
timings are then upper bounds.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil

from megatron_rwkvx.models.recompute import MODE_FLAGS
from megatron_rwkvx.testing.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
ITERATION = re.compile(r"^iteration\s+(\d+)/\d+ \| loss (\S+) ")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--recompute", nargs="*", choices=sorted(MODE_FLAGS), default=["none", "full", "selective"],
                   help="recompute modes run at every length (none given: only the LongCE run)")
    p.add_argument("--longce-window", type=int, default=8192,
                   help="one LongCE run (full recompute) at the longest length with this window; 0: none")
    p.add_argument("--longce-stride", type=int, default=4096)
    p.add_argument("--iters", type=int, default=3, help="training iterations per run (at least 2)")
    p.add_argument("--layer-pattern", default="RRAR")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--head-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=1024, help="--sparse-chunk-size")
    p.add_argument("--top-k", type=int, default=2, help="--sparse-top-k")
    p.add_argument("--cp", type=int, default=2, help="--context-parallel-size (= processes)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--work-dir", default=None, help="where the data goes (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.iters < 2:
        p.error("--iters must be at least 2: s/iteration is the spacing of the iterations after the first")
    return args


def make_data(work: Path, pack_length: int) -> str:
    corpus, prefix = work / "corpus", work / "data" / f"bytes{pack_length}"
    for argv in (
        ["tools/make_sample_corpus.py", "--output", str(corpus), "--overwrite"],
        ["tools/preprocess_data.py", "--input", str(corpus / "text.jsonl"), "--output-prefix", str(prefix),
         "--tokenizer-type", "ByteTokenizer", "--append-eod", "--pack-length", str(pack_length),
         "--workers", "1", "--overwrite"],
    ):
        subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return f"{prefix}_text_document"


def _peak_rss_kib(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _ranks(launcher: psutil.Process) -> Dict[int, int]:
    """pid -> RANK of the launcher's worker processes."""
    out = {}
    for child in launcher.children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.Error, OSError):
            continue
        if rank is not None:
            out[child.pid] = int(rank)
    return out


def run_once(args, data: str, seq_length: int, recompute: str, loss: str = "ce") -> dict:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.cp),
            "--master-port", str(free_port()), "-m", "megatron_rwkvx.pretrain", "--device", "cpu",
            "--tokenizer-type", "ByteTokenizer", "--data-path", data, "--split", "100,0,0", "--eval-iters", "0",
            "--layer-pattern", args.layer_pattern, "--hidden-size", str(args.hidden_size),
            "--head-size", str(args.head_size), "--sparse-chunk-size", str(args.chunk),
            "--sparse-top-k", str(args.top_k), "--context-parallel-size", str(args.cp),
            "--seq-length", str(seq_length), "--micro-batch-size", "1", "--global-batch-size", "1",
            "--train-iters", str(args.iters), "--log-interval", "1", "--lr", "1e-3",
            *MODE_FLAGS[recompute]]
    if loss == "longce":
        argv += ["--loss", "longce", "--longce-window", str(args.longce_window),
                 "--longce-stride", str(args.longce_stride)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    peaks: Dict[int, int] = {}
    lines: List[tuple] = []  # (arrival time, line): the iteration lines' spacing is s/iteration
    start = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = threading.Thread(target=lambda: lines.extend((time.time(), ln) for ln in proc.stdout), daemon=True)
    reader.start()
    launcher = psutil.Process(proc.pid)
    while proc.poll() is None:
        for pid, rank in _ranks(launcher).items():
            kib = _peak_rss_kib(pid)
            if kib is not None:
                peaks[rank] = max(peaks.get(rank, 0), kib)
        time.sleep(0.2)
    reader.join()
    text = "".join(ln for _, ln in lines)
    if proc.returncode != 0:
        raise SystemExit(f"error: the run at T={seq_length} recompute={recompute} loss={loss} failed "
                         f"(exit {proc.returncode}):\n{text[-4000:]}")
    its = [(t, float(m.group(2))) for t, ln in lines if (m := ITERATION.match(ln))]
    # The first iteration also warms up: s/iteration is the median spacing of the later ones.
    steps = [b[0] - a[0] for a, b in zip(its, its[1:])]
    return dict(T=seq_length, recompute=recompute, loss=loss, iters=len(its), last_loss=its[-1][1] if its else None,
                s_per_iter=statistics.median(steps) if steps else None, wall_s=time.time() - start,
                peak_rss_gib=[peaks.get(r, 0) / 2**20 for r in range(args.cp)])


def table(rows: List[dict]) -> str:
    lines = ["| T | recompute | loss | iterations | s/iteration | run wall s | peak RSS per rank (GiB) | last loss |",
             "|---:|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        rss = " / ".join(f"{g:.2f}" for g in r["peak_rss_gib"])
        lines.append(f"| {r['T']:,} | {r['recompute']} | {r['loss']} | {r['iters']} | {r['s_per_iter']:.1f} | {r['wall_s']:.0f} | "
                     f"{rss} | {r['last_loss']:.4f} |")
    return "\n".join(lines)


def growth(rows: List[dict], recompute: str) -> Optional[str]:
    """Peak-RSS increments between successive doublings of T: about 2x when memory is linear in T
    (4x would be T x T)."""
    pts = sorted((r["T"], max(r["peak_rss_gib"])) for r in rows if r["recompute"] == recompute and r["loss"] == "ce")
    if len(pts) < 3:
        return None
    steps = [(b[1] - a[1]) for a, b in zip(pts, pts[1:])]
    ratios = [f"{b / a:.2f}" if a > 0 else "-" for a, b in zip(steps, steps[1:])]
    return (f"recompute {recompute}: peak RSS increments " + ", ".join(f"{s:+.2f} GiB" for s in steps)
            + f" per doubling of T; ratio of successive increments {', '.join(ratios)} (linear: 2, T x T: 4)")


def main(argv=None) -> None:
    args = parse_args(argv)
    longest = max(args.lengths)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        data = make_data(work, longest)
        rows = []
        for T in sorted(args.lengths):
            for mode in args.recompute:
                rows.append(run_once(args, data, T, mode))
                print(f"done: T={T:,} recompute={mode}: {rows[-1]['s_per_iter']:.1f} s/iteration", flush=True)
        if args.longce_window:
            rows.append(run_once(args, data, longest, "full", loss="longce"))
    print(f"\nRWKV-X {args.layer_pattern}, width {args.hidden_size}, head {args.head_size}, sparse chunk "
          f"{args.chunk} top-{args.top_k}, ByteTokenizer, CP {args.cp} (gloo), micro/global batch 1, "
          f"{args.threads} thread(s) per rank\n")
    print(table(rows))
    for mode in args.recompute:
        line = growth(rows, mode)
        if line:
            print(line)


if __name__ == "__main__":
    main()
