#!/usr/bin/env python
"""Random-kill soak of checkpoint/resume: kill a small CPU training run again and again, resume it
each time, and check that nothing is lost or changed.

Each attempt resumes the run's --save directory and is killed at a random point, chosen among
  timer           SIGKILL at a random moment of the attempt's training (steps, saves, anything);
  in-write        SIGKILL of the run while its checkpoint writer processes run (a random save);
  before-pointer  death after a save's shards and manifest are written, before the pointer moves.
After every attempt it checks: no process of the attempt is left (the attempt ran in a session of
its own); the pointer never moves back and names an intact iteration (manifest verified); every
loss the attempt logged equals the uninterrupted run's (to the six printed decimals). A run that
reaches its last iteration starts over in a fresh directory until --kills kills were made.

    python tools/soak_checkpoints.py --data-path DATA_PREFIX --kills 20

Prints one line per attempt and a summary; exits 1 if any check failed. The data prefix is any
tokenized dataset (tools/preprocess_data.py); the model is tiny (two RWKV-7 blocks, width 32).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from megatron_rwkvx.checkpointing.megatron_format import read_latest_iteration
from megatron_rwkvx.testing.processes import wait_until_session_ends
from megatron_rwkvx.training.checkpoint_integrity import iteration_damage

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--hidden-size", "32", "--head-size", "16", "--layer-pattern", "RR", "--seq-length", "32",
         "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "3e-3", "--eval-iters", "0",
         "--log-interval", "1", "--device", "cpu"]
MODES = ("timer", "in-write", "before-pointer")
_LOSS = re.compile(r"iteration\s+(\d+)/\d+ \| loss (\S+)")


def _losses(text: str) -> dict:
    return {int(m.group(1)): m.group(2) for m in _LOSS.finditer(text)}


def _attempt(command, env, kill_after=None):
    """Run ``command`` in a session of its own; SIGKILL it ``kill_after`` seconds after its
    training starts (None: let it end). Returns (exit status, output, survivors of the session,
    seconds from the start of training to the end)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        started = None
        while proc.poll() is None:
            time.sleep(0.05)
            if started is None:
                out.seek(0)
                if "model: pattern" in out.read():
                    started = time.monotonic()
            elif kill_after is not None and time.monotonic() - started >= kill_after:
                proc.send_signal(signal.SIGKILL)
        proc.wait()
        trained = time.monotonic() - started if started is not None else 0.0
        survivors = wait_until_session_ends(proc.pid)
        for pid in survivors:  # reported as a failure; do not let them run on
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        return proc.returncode, out.read(), survivors, trained


def soak(data_path: str, kills: int, iters: int, save_interval: int, seed: int, workdir: Path,
         extra=(), reference=None, seconds_per_iteration=1.0) -> dict:
    """Returns a summary; ``failures`` lists what went wrong. ``reference``: the uninterrupted
    run's losses {iteration: "x.xxxxxx"} if known (with ``seconds_per_iteration`` for the random
    kill times); else that run is made first and timed."""
    rng = random.Random(seed)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for name in ("BEFORE_LATEST", "KILL_IN_WRITE", "ENOSPC", "SIGTERM_IN_SAVE"):
        env.pop(f"MEGATRON_RWKVX_FAULT_{name}", None)
    base = [sys.executable, "-m", "megatron_rwkvx.pretrain", *MODEL, "--data-path", data_path,
            "--train-iters", str(iters), *extra]
    if reference is None:
        rc, text, _, trained = _attempt(base, env)
        reference = _losses(text)
        if rc != 0 or sorted(reference) != list(range(1, iters + 1)):
            raise SystemExit(f"the uninterrupted run failed (exit {rc}):\n{text[-3000:]}")
        seconds_per_iteration = trained / iters
        print(f"uninterrupted run: {iters} iterations, {trained:.1f} s of training", flush=True)

    made, failures, attempts, cycle = Counter(), [], 0, 0
    while sum(made.values()) < kills:
        directory = workdir / f"run{cycle}"
        cycle += 1
        pointer, stuck_at = None, None
        while True:
            attempts += 1
            start = pointer or 0
            mode = rng.choice(MODES)
            saves = [i for i in range(start + 1, iters + 1) if i % save_interval == 0]
            attempt_env, kill_after = dict(env), None
            if stuck_at == start:
                # The last attempt made no progress from here: this one gets past the next save
                # (or to the end), so that the kills spread over the whole run instead of piling
                # up at its last save.
                saves = saves[1:]
                if mode == "timer" or not saves:
                    mode = "none"
            if mode in ("in-write", "before-pointer") and saves and sum(made.values()) < kills:
                hook = "KILL_IN_WRITE" if mode == "in-write" else "BEFORE_LATEST"
                attempt_env[f"MEGATRON_RWKVX_FAULT_{hook}"] = str(rng.choice(saves))
            elif mode != "none" and sum(made.values()) < kills:
                mode = "timer"
                kill_after = rng.uniform(0, seconds_per_iteration * (iters - start))
            else:
                mode = "none"
            command = [*base, "--save", str(directory), "--load", str(directory),
                       "--save-interval", str(save_interval)]
            rc, text, survivors, _ = _attempt(command, attempt_env, kill_after)
            killed = rc in (-signal.SIGKILL, 17)
            problems = []
            if survivors:
                problems.append(f"processes left after the run ended: {survivors}")
            changed = {i: (v, reference[i]) for i, v in _losses(text).items() if reference.get(i) != v}
            if changed:
                problems.append(f"losses differ from the uninterrupted run: {changed}")
            if not killed and rc != 0:
                problems.append(f"exit {rc}: {text[-2000:]}")
            new_pointer = read_latest_iteration(str(directory)) if directory.is_dir() else None
            if pointer is not None and (new_pointer is None or new_pointer < pointer):
                problems.append(f"the pointer moved back from {pointer} to {new_pointer}")
            if new_pointer is not None:
                damage, _ = iteration_damage(str(directory), new_pointer)
                if damage:
                    problems.append(f"the newest checkpoint is damaged: {damage}")
            if killed:
                made[mode] += 1
            print(f"attempt {attempts}: {mode:<14} from iteration {start:>3}: exit {rc}, pointer "
                  f"{new_pointer}, {len(_losses(text))} losses{'; ' + '; '.join(problems) if problems else ''}",
                  flush=True)
            failures += [f"attempt {attempts}: {p}" for p in problems]
            stuck_at = start if killed and (new_pointer or 0) == start else None
            pointer = new_pointer
            if failures or (rc == 0 and "done:" in text):
                break
        if failures:
            break
    return {"kills": sum(made.values()), "by_mode": dict(made), "attempts": attempts,
            "fresh_runs": cycle, "iterations": iters, "save_interval": save_interval,
            "seed": seed, "failures": failures}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", required=True, help="tokenized dataset prefix")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--iters", type=int, default=10, help="iterations of each run")
    p.add_argument("--save-interval", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: a temporary directory")
    p.add_argument("--json", default=None, help="also write the summary here")
    args, extra = p.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak_") as tmp:
        summary = soak(args.data_path, args.kills, args.iters, args.save_interval, args.seed,
                       Path(args.workdir or tmp), extra)
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
