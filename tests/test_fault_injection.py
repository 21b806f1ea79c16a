"""Faults a user meets on a shared machine, through the real entry point in subprocesses."""
from __future__ import annotations

import importlib.util
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from megatron_rwkvx.checkpointing import manifest
from megatron_rwkvx.testing.processes import wait_until_session_ends
from megatron_rwkvx.training.checkpoint_integrity import iteration_damage
from test_data_datasets import make_dataset
from test_training_system import PY, ROOT, _env, _losses, _run

TINY_RUN = ["--hidden-size", "32", "--head-size", "16", "--layer-pattern", "RR", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--eval-iters", "0",
            "--log-interval", "1", "--device", "cpu"]


def test_two_single_process_runs_share_a_machine(tmp_path):
    """Before: the second run died with a DistNetworkError traceback (port 29500 in use). A port held
    by someone else must not matter to a run of one process."""
    data = make_dataset(str(tmp_path / "docs"), 60, seed=0)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = _env()
        env["MASTER_PORT"] = str(busy.getsockname()[1])
        command = [PY, "-m", "megatron_rwkvx.pretrain", *TINY_RUN, "--data-path", data]
        with ThreadPoolExecutor(2) as pool:
            runs = list(pool.map(lambda _: _run(command, env=env, timeout=300, check=False), range(2)))
    for out in runs:
        assert out.returncode == 0, out.stderr[-3000:]
        assert sorted(_losses(out.stdout)) == [1, 2], out.stdout[-2000:]


# --- Checkpoints: damaged saves named and survivable, no orphans, faults mid-save ----------------
# One uninterrupted reference run, then every faulted run and resume at once, two at a time: each
# resume must log exactly the reference's losses.

ITERS, INTERVAL = 6, 2
LATEST = "latest_checkpointed_iteration.txt"
_spec = importlib.util.spec_from_file_location("soak_checkpoints", ROOT / "tools" / "soak_checkpoints.py")
soak_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak_tool)


def _run_args(data, *extra):
    return [*soak_tool.MODEL, "--data-path", data, "--train-iters", str(ITERS), *map(str, extra)]


def _pretrain(*args, env=None):
    return _run([PY, "-m", "megatron_rwkvx.pretrain", *args], env=env or _env(), timeout=300, check=False)


def _in_session(args, env):
    """A run in a session of its own: (its result, the processes of the session left after it)."""
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        proc = subprocess.Popen([PY, "-m", "megatron_rwkvx.pretrain", *args], cwd=ROOT, stdout=fo,
                                stderr=fe, text=True, env=env, start_new_session=True)
        proc.wait(timeout=300)
        survivors = wait_until_session_ends(proc.pid)
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        fo.seek(0)
        fe.seek(0)
        return subprocess.CompletedProcess(args, proc.returncode, fo.read(), fe.read()), survivors


def _fault_env(name, iteration):
    env = _env()
    env[f"MEGATRON_RWKVX_FAULT_{name}"] = str(iteration)
    return env


def _rewrite(path, data: bytes):
    """Damage a file of a hard-linked copy without touching the original: a new inode."""
    path.unlink()
    path.write_bytes(data)


def _truncate_shard(it):
    shard = max(it.glob("*.distcp"), key=lambda p: p.stat().st_size)
    _rewrite(shard, shard.read_bytes()[:1000])
    return shard.name


def _delete_shard(it):
    shard = sorted(it.glob("*.distcp"))[-1]
    shard.unlink()
    return shard.name


def _break_metadata(it):
    _rewrite(it / "metadata.json", b'{"sharded_backend": ')
    return "metadata.json"


class _Runs:
    """Not a tensor: what torch.load(weights_only=False) would call."""

    def __reduce__(self):
        return (print, ("this ran",))


def _pickle_in_common(it):
    """A common.pt holding a pickled callable, with a manifest rewritten to agree: only the
    weights-only loader stands between it and running code."""
    buffer = io.BytesIO()
    torch.save({"train_state": _Runs()}, buffer)
    _rewrite(it / "common.pt", buffer.getvalue())
    (it / manifest.MANIFEST_FILE).unlink()
    manifest.write_manifest(str(it), manifest.describe_files(str(it), manifest.manifest_candidates(str(it))))
    return "common.pt"


DAMAGE = {"truncated shard": _truncate_shard, "deleted shard": _delete_shard,
          "broken metadata.json": _break_metadata, "pickled objects in common.pt": _pickle_in_common}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("faults") / "docs"), 60, seed=0)


def _faults_mid_save_chain(data, ckpt):
    """Faults inside the save of iteration 4, one after another in one --save directory, each run
    resuming the last: kill -9 while the writer processes run, a full disk (ENOSPC from the
    kernel: a shard file is /dev/full), SIGTERM between shards and pointer; then the end."""
    command = _run_args(data, "--save", ckpt, "--load", ckpt, "--save-interval", INTERVAL)
    chain = {}
    for fault in ("KILL_IN_WRITE", "ENOSPC", "SIGTERM_IN_SAVE", None):
        out, survivors = _in_session(command, _fault_env(fault, 4) if fault else _env())
        chain[fault] = SimpleNamespace(out=out, survivors=survivors, latest=(ckpt / LATEST).read_text().strip(),
                                       iterations=sorted(p.name for p in ckpt.glob("iter_*")))
    return chain


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The reference run (iterations 2, 4, 6 saved), then, two at a time: resumes of hard-linked
    copies of its checkpoints with iteration 6 damaged (plain, with --ckpt-step 4, with
    --auto-fallback), the mid-save fault chain, and a short random-kill soak."""
    d = tmp_path_factory.mktemp("fault_runs")
    ckpt = d / "reference"
    out = _pretrain(*_run_args(data, "--save", ckpt, "--save-interval", INTERVAL))
    assert out.returncode == 0, out.stderr[-3000:]
    reference = _losses(out.stdout)
    assert sorted(reference) == list(range(1, ITERS + 1))

    copies, names = {}, {}
    for case in (*DAMAGE, "--ckpt-step", "--auto-fallback"):
        copies[case] = shutil.copytree(ckpt, d / case.strip("-").replace(" ", "_"), copy_function=os.link)
        names[case] = DAMAGE.get(case, _truncate_shard)(copies[case] / "iter_0000006")
    jobs = {case: partial(_pretrain, *_run_args(data, "--load", path)) for case, path in copies.items()}
    jobs["--ckpt-step"] = partial(_pretrain, *_run_args(data, "--load", copies["--ckpt-step"], "--ckpt-step", 4))
    jobs["--auto-fallback"] = partial(_pretrain, *_run_args(
        data, "--load", copies["--auto-fallback"], "--save", copies["--auto-fallback"], "--auto-fallback"))
    jobs["mid-save"] = partial(_faults_mid_save_chain, data, d / "mid_save")
    jobs["soak"] = partial(soak_tool.soak, data, kills=2, iters=ITERS, save_interval=INTERVAL, seed=3,
                           workdir=d / "soak", reference=reference)
    order = ["mid-save", "soak", "--ckpt-step", "--auto-fallback", *DAMAGE]  # longest first
    with ThreadPoolExecutor(2) as pool:
        outs = dict(zip(order, pool.map(lambda case: jobs[case](), order)))
    return SimpleNamespace(reference=reference, copies=copies, names=names, out=outs)


def _same_losses(out, reference, first):
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    got = _losses(out.stdout)
    assert sorted(got) == list(range(first, ITERS + 1)), out.stdout[-2000:]
    assert all(got[i] == reference[i] for i in got), (got, reference)


def _one_error_line(out):
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, out.stderr[-3000:]
    return error[0]


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_newest_checkpoint_is_named_with_the_way_back(runs, case):
    """Before: raw tracebacks, exit 1 (EOFError, FileNotFoundError, JSONDecodeError, and an
    UnpicklingError advising weights_only=False, which would run the pickled code). After: one
    error: line naming the damaged file, the newest intact iteration and --ckpt-step to load it."""
    out = runs.out[case]
    assert out.returncode == 2, f"{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    error = _one_error_line(out)
    assert "iteration 6 is damaged" in error and runs.names[case] in error
    assert "newest intact earlier iteration is 4" in error and "--ckpt-step 4" in error
    assert "weights_only" not in out.stderr and "this ran" not in out.stdout + out.stderr
    if case == "pickled objects in common.pt":
        assert "pickled Python objects (print)" in error and "tampered with or replaced" in error


def test_ckpt_step_resumes_the_intact_iteration(runs):
    out = runs.out["--ckpt-step"]
    assert "resumed from" in out.stdout and "at iteration 4" in out.stdout
    _same_losses(out, runs.reference, 5)


def test_auto_fallback_resumes_the_newest_intact_iteration_loudly(runs):
    out = runs.out["--auto-fallback"]
    assert "WARNING: --auto-fallback: iteration 6" in out.stdout and "resuming from iteration 4" in out.stdout
    _same_losses(out, runs.reference, 5)
    ckpt = runs.copies["--auto-fallback"]
    assert (ckpt / LATEST).read_text().strip() == "6"
    assert iteration_damage(str(ckpt), 6) == (None, None)  # saved again, intact


def test_kill9_mid_save_leaves_no_process_and_the_previous_checkpoint(runs):
    """Before: dist_checkpointing's processes (the spawned result-queue manager, the forked
    writers) outlived a kill -9 of the run, reparented to init, for as long as the machine ran.
    After: they die with it; the previous checkpoint is the newest (the next run resumes it
    exactly: see the disk-full test's losses)."""
    killed = runs.out["mid-save"]["KILL_IN_WRITE"]
    assert killed.out.returncode == -signal.SIGKILL, killed.out.stdout[-3000:]
    assert killed.survivors == {}
    assert killed.latest == "2"


def test_disk_full_during_a_save_is_named_and_loses_nothing(runs):
    """After the kill, this run resumes at 2 with the reference's losses; the save of 4 meets a
    full disk: one error: line, the partial save removed, the pointer still at 2."""
    full = runs.out["mid-save"]["ENOSPC"]
    assert full.out.returncode == 2, full.out.stdout[-3000:] + full.out.stderr[-3000:]
    error = _one_error_line(full.out)
    assert "No space left on device" in error and "previous checkpoint (iteration 2) is intact" in error
    assert full.latest == "2" and full.iterations == ["iter_0000002"]
    assert full.survivors == {}
    losses = _losses(full.out.stdout)
    assert sorted(losses) == [3, 4] and all(losses[i] == runs.reference[i] for i in losses)


def test_sigterm_during_a_save_finishes_it_then_saves_and_exits(runs):
    stopped, end = runs.out["mid-save"]["SIGTERM_IN_SAVE"], runs.out["mid-save"][None]
    assert stopped.out.returncode == 0, stopped.out.stdout[-3000:]
    assert "exiting at iteration 5 (signal)" in stopped.out.stdout
    assert stopped.latest == "5" and stopped.iterations == ["iter_0000002", "iter_0000004", "iter_0000005"]
    assert stopped.survivors == {}
    losses = _losses(stopped.out.stdout)
    assert sorted(losses) == [3, 4, 5] and all(losses[i] == runs.reference[i] for i in losses)
    _same_losses(end.out, runs.reference, 6)


def test_random_kills_then_resumes_never_lose_or_change_anything(runs):
    """The soak tool, briefly: kills at random points (a timer, inside the writer, between shards
    and pointer), each resumed; it checks survivors, the pointer and every loss."""
    summary = runs.out["soak"]
    assert summary["failures"] == [] and summary["kills"] == 2, summary
