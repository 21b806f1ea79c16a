"""Faults a user meets on a shared machine, through the real entry point in subprocesses."""
from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

from test_data_datasets import make_dataset
from test_training_system import PY, _env, _losses, _run

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
