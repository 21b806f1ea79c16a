"""The layout planner: parameter counts of the reference models and sane suggestions."""
import subprocess
import sys
from pathlib import Path

from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.parallel.memory_model import estimate, parameter_count, suggest_layouts

ROOT = Path(__file__).resolve().parents[1]


def test_reference_model_sizes():
    small = RWKVXConfig(hidden_size=768, layer_pattern="RRRA" * 4)
    large = RWKVXConfig(hidden_size=2560, layer_pattern="RRRRA" * 8)
    assert abs(parameter_count(small)["total"] / 1e9 - 0.22) < 0.02
    assert abs(parameter_count(large)["total"] / 1e9 - 3.6) < 0.1


def test_memory_terms_scale_as_documented():
    cfg = RWKVXConfig(hidden_size=2560, layer_pattern="RRRRA" * 8)
    base = estimate(cfg, 65536, 1, tp=2, pp=1, cp=2, dp=4)
    assert abs(estimate(cfg, 131072, 1, 2, 1, 2, 4).activations_gib / base.activations_gib - 2) < 1e-9
    # Doubling CP halves what a rank keeps per local token; the sparse blocks' gathered K/V
    # (the whole sequence's on the last rank) does not shrink.
    ratio = estimate(cfg, 65536, 1, 2, 1, 4, 2).activations_gib / base.activations_gib
    assert 0.5 < ratio < 0.52
    rwkv = RWKVXConfig(hidden_size=2560, layer_pattern="R" * 40)
    rwkv_base = estimate(rwkv, 65536, 1, 2, 1, 2, 4).activations_gib
    assert abs(estimate(rwkv, 65536, 1, 2, 1, 4, 2).activations_gib / rwkv_base - 0.5) < 1e-9
    recomputed = estimate(cfg, 65536, 1, 2, 1, 2, 4, recompute=("full", "uniform", 1))
    assert recomputed.activations_gib < base.activations_gib / 5
    assert estimate(cfg, 65536, 1, 4, 1, 2, 2).params_gib < base.params_gib


def test_suggestions_fit_and_respect_constraints():
    cfg = RWKVXConfig(hidden_size=2560, layer_pattern="RRRRA" * 8)
    layouts = suggest_layouts(cfg, 65536, gpus=64, gpu_memory_gib=80)
    assert layouts
    for l in layouts:
        assert l.tp * l.pp * l.cp * l.dp == 64
        assert l.total_gib <= 0.85 * 80
        assert 40 % l.tp == 0 and (65536 // l.cp) % 2048 == 0


def test_cli_prints_a_table():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plan_parallelism.py"), "--model", "0.22B",
         "--seq-length", "65536", "--gpus", "8", "--gpu-memory", "80"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "suggested: --tensor-model-parallel-size" in out.stdout
