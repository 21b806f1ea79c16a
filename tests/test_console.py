"""A quiet console: megatron-core's import-time notices are silenced, ours are not, and a run says
once in our own words which optional accelerations it uses."""
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import megatron_rwkvx  # noqa: F401  (installs the filters, as every entry point does)
from megatron_rwkvx.console import accelerations_line
from megatron_rwkvx.testing.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# A warning line as Python prints it: "path:line: Category: message".
WARNING_LINE = re.compile(r"^\S+:\d+: \w*(UserWarning|DeprecationWarning|FutureWarning): ", re.M)


def _run(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([PY, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_pretrain_help_prints_no_megatron_core_warnings():
    out = _run("-m", "megatron_rwkvx.pretrain", "--help")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--recompute-granularity" in out.stdout
    assert not WARNING_LINE.search(out.stderr), out.stderr[-3000:]


def test_a_run_says_its_accelerations_once_and_prints_no_megatron_core_warnings():
    out = _run("-m", "megatron_rwkvx.pretrain", "--device", "cpu", "--mock-data", "--tokenizer-type", "ByteTokenizer",
               "--hidden-size", "32", "--head-size", "16", "--layer-pattern", "RA", "--sparse-chunk-size", "16",
               "--sparse-top-k", "2", "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "1",
               "--train-iters", "1", "--eval-iters", "0", "--lr", "1e-3")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("accelerations: ")]
    assert len(lines) == 1, out.stdout
    assert "Transformer Engine" in lines[0] and "Apex" in lines[0] and "Triton" in lines[0] and "fla" in lines[0]
    # CPU: our operators run torch, so neither Triton nor fla is active.
    assert "active" not in lines[0]
    assert not WARNING_LINE.search(out.stderr), out.stderr[-3000:]


def test_only_megatron_core_notices_are_filtered():
    def shown(message, module, category=UserWarning):
        with warnings.catch_warnings(record=True) as caught:
            # catch_warnings copies the filters installed at import; "always" goes behind them.
            warnings.simplefilter("always")
            megatron_rwkvx.console.install_warning_filters()
            warnings.warn_explicit(message, category, "f.py", 1, module=module)
        return len(caught) == 1

    assert not shown("Transformer Engine and Apex are not installed. Falling back", "megatron.core.optimizer")
    assert not shown("full scope is deprecated.", "megatron.core.transformer.transformer_config")
    assert not shown("old", "megatron.core.utils", DeprecationWarning)
    # Ours, anyone else's, and megatron-core's other warnings still print.
    assert shown("Transformer Engine and Apex are not installed", "megatron_rwkvx.training.loop")
    assert shown("something is deprecated", "torch.distributed")
    assert shown("gradient overflow", "megatron.core.optimizer")


def test_the_accelerations_line_names_what_a_run_uses():
    line = accelerations_line(["triton", "torch"])
    assert line.startswith("accelerations: ")
    assert ("Triton active" in line) == megatron_rwkvx.console.installed("triton")
    assert "Triton active" not in accelerations_line(["torch"])
