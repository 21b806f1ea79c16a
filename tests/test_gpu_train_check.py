"""tools/gpu_train_check.py: the smoke mode runs every code path of the trainer check for real (the
pretrain loop: the loss comparison with its reference in a child process as on the GPU, sparse and
dense, each recompute mode, the planner); the time budget skips what it cannot fit and says so."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_rwkvx.benchmarks.gpu_train_check import cases, cli, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_mode_runs_the_loop_in_every_configuration(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, os.path.join("tools", "gpu_train_check.py"), "--smoke",
                           "--output", str(out), "--work-dir", str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    check = res["loss_check"]
    assert check["passed"] and len(check["reference_losses"]) == 3
    # Same weights, same batches; the device side trains in bf16 (on the CPU here): close, not equal.
    assert check["device_type"] == "cpu" and check["rtol"] == 2e-2
    assert 0 < max(check["relative_difference"]) <= 2e-2
    # The reference ran in a child (--worker, the GPU path), the rest in the tool's own process.
    assert check["reference"]["peak_kind"] == "peak RSS (CPU)"
    assert check["device"]["peak_kind"].endswith("of the smoke process so far")
    rows = {(r["attention"], r["recompute"]): r for r in res["cases"]}
    assert set(rows) == {("sparse", "none"), ("dense", "none"), ("sparse", "full"), ("sparse", "selective")}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["timed_steps"] == 1 and len(r["losses"]) == 2 and r["tokens_per_s"] > 0
        assert r["planner"]["total_gib"] > 0 and r["peak_gib"] > 0
    # The first step (initial weights, same batch) is the same loss whatever the recompute mode.
    first = rows[("sparse", "none")]["losses"][0]
    assert rows[("sparse", "full")]["losses"][0] == pytest.approx(first, rel=1e-6)
    assert rows[("sparse", "selective")]["losses"][0] == pytest.approx(first, rel=1e-6)
    # T = 64 > chunk 16 x top-k 2: the dense baseline attends more keys (same loss at init: the
    # A blocks start as the identity, zero output projection).
    assert rows[("dense", "none")]["flops_per_token"] > rows[("sparse", "none")]["flops_per_token"]
    assert any(b.startswith("dense-attention: backend sdpa") for b in rows[("dense", "none")]["backends"])
    assert any(b.startswith("sparse-attention: backend torch") for b in rows[("sparse", "none")]["backends"])
    assert rows[("sparse", "none")]["sparse_over_dense"] > 0
    # Recompute keeps less for the backward, as the planner says.
    planned = {k: r["planner"]["activations_gib"] for k, r in rows.items()}
    assert planned[("sparse", "full")] < planned[("sparse", "selective")] < planned[("sparse", "none")]
    assert "| tiny | 64 | dense | none | ok |" in proc.stdout and "loss check (bf16 on cpu vs fp32 on cpu" in proc.stdout
    assert res["skipped"] == [] and "MFU = 3 x model_flops_per_token" in res["meta"]["flop_formula"]


class _InstantChild:
    """A configuration that 'runs' in no time, so that the budget logic is tested alone."""

    started = []

    def __init__(self, bench, name, device, argv, warmup, work, timeout, threads):
        self.name, self.argv = name, argv
        _InstantChild.started.append(name)

    def result(self):
        return {"status": "ok", "losses": [1.0], "step_s": [0.5, 0.5], "timed_steps": 1,
                "tokens_per_s": 100.0, "peak_gib": 1.0, "planner": {"total_gib": 1.1}, "backends": []}


def test_the_budget_skips_the_remaining_configurations_and_names_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "_Child", _InstantChild)
    monkeypatch.setattr(run, "_InProcess", _InstantChild)
    clock = iter(range(0, 1000, 50))  # each look at the clock: 50 s later
    monkeypatch.setattr(run.Bench, "elapsed", lambda self: next(clock))
    parser = cli.build_parser()
    args = cli.check(parser, parser.parse_args(["--smoke", "--budget-s", "120", "--work-dir", str(tmp_path),
                                                "--output", str(tmp_path / "r.json")]))
    _InstantChild.started = []
    assert run.run(args) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    ran = [r for r in res["cases"] if r["status"] == "ok"]
    assert 0 < len(ran) < 4 and len(res["skipped"]) == 4 - len(ran)
    assert all(r["status"].startswith("skipped: time budget (120 s)") for r in res["cases"][len(ran):])
    assert "skipped (--budget-s 120 spent): " + "; ".join(res["skipped"]) in capsys.readouterr().out
    assert res["cases"][0]["sparse_over_dense"] == pytest.approx(1.0)


def test_the_gpu_plan_covers_the_paper_model_both_lengths_and_the_dense_baseline():
    plan = cases.timed_cases([16384, 65536], 2048, smoke=False)
    names = [c.name for c in plan]
    assert names[:4] == ["0.2B T=16384 sparse recompute=none", "0.2B T=16384 dense recompute=none",
                         "0.2B T=65536 sparse recompute=none", "0.2B T=65536 dense recompute=none"]
    assert {c.recompute for c in plan if c.shape.name == "0.2B"} == {"none", "full", "selective"}
    paper = plan[0].shape
    assert (paper.width, paper.pattern, paper.chunk, paper.top_k, paper.vocab) == (768, "RRRA" * 4, 2048, 3, 65536)
    argv = cases.case_argv(plan[1], cases.GPU, 5, seed=1, lr=1e-4)
    assert {"--bf16", "--mock-data"} <= set(argv)
    assert argv[argv.index("--wkv-backend") + 1] == argv[argv.index("--sparse-attention-backend") + 1] == "triton"
    assert argv[argv.index("--attention-mode") + 1] == "dense"
    with pytest.raises(SystemExit):
        cli.check(cli.build_parser(), cli.build_parser().parse_args(["--steps", "2", "--warmup", "2"]))
