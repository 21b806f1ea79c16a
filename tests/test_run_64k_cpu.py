"""tools/run_64k_cpu.py at a tiny length: the real two-process CP run, its table and growth line."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_64k_tool_runs_cp2_with_recompute_and_longce_at_a_tiny_length(tmp_path):
    out = subprocess.run(
        [sys.executable, "tools/run_64k_cpu.py", "--lengths", "128", "256", "512", "--recompute", "full",
         "--iters", "2", "--chunk", "32", "--longce-window", "128", "--longce-stride", "64",
         "--work-dir", str(tmp_path)],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = re.findall(r"^\| ([\d,]+) \| (\w+) \| (\w+) \| (\d+) \| ([\d.]+) \| \d+ \| ([\d.]+) / ([\d.]+) \|",
                      out.stdout, re.M)
    assert [(t, mode, loss, n) for t, mode, loss, n, *_ in rows] == [
        ("128", "full", "ce", "2"), ("256", "full", "ce", "2"), ("512", "full", "ce", "2"),
        ("512", "full", "longce", "2")]
    # Each rank's peak RSS was read: at least the interpreter with torch loaded.
    assert all(float(r0) > 0.1 and float(r1) > 0.1 for *_, r0, r1 in rows)
    assert "recompute full: peak RSS increments" in out.stdout
