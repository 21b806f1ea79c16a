"""The GPU check as a package (megatron_rwkvx/benchmarks/gpu_check): importing it does no work,
and the command keeps its flags."""
from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys

import megatron_rwkvx.benchmarks.gpu_check as gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_every_module_does_no_work():
    # In a fresh interpreter with arguments the check would reject: no parsing, no output, no
    # interpreter switch, no CUDA or process-group set-up at import.
    names = [f"{gpu_check.__name__}.{m.name}" for m in pkgutil.iter_modules(gpu_check.__path__)]
    assert {"bench", "breakdown", "cli", "correctness", "layers", "run", "sweeps", "timing"} <= {
        n.rsplit(".", 1)[1] for n in names}
    code = (
        "import os, sys, importlib, torch\n"
        "sys.argv = ['gpu_check', '--no-such-flag']\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'TRITON_INTERPRET' not in os.environ\n"
        "assert not torch.distributed.is_initialized()\n"
        "print('imported', len(sys.argv))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "imported 2\n"


def test_the_command_keeps_its_flags():
    args = importlib.import_module(f"{gpu_check.__name__}.cli").build_parser().parse_args(
        ["--quick", "--budget-s", "280", "--lengths", "4096,65536", "--no-profile", "--no-variants",
         "--no-sparse-variants", "--skip-timing", "--profile-length", "64", "--variant-lengths", "16",
         "--sparse-variant-lengths", "32", "--out", "x.json"])
    plan = importlib.import_module(f"{gpu_check.__name__}.cli").settings(args)
    assert plan.budget_s == 280 and plan.lengths == [4096, 65536] and plan.profile_length == 64
    assert plan.variant_lengths == [16] and plan.sparse_variant_lengths == [32]
    help_text = subprocess.run([sys.executable, os.path.join("tools", "gpu_check.py"), "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=300).stdout
    assert "--budget-s" in help_text and "--cpu-smoke" in help_text
