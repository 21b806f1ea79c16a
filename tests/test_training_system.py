"""The training system end to end on the CPU: the real entry point in subprocesses."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MODEL = ["--hidden-size", "64", "--head-size", "16", "--layer-pattern", "RRR"]


def _env():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("MEGATRON_RWKVX_FAULT_BEFORE_LATEST", None)
    if "MASTER_PORT" not in env:  # single-process runs would all rendezvous on 29500
        from megatron_rwkvx.testing.distributed import free_port

        env["MASTER_PORT"] = str(free_port())
    return env


def _run(args, env=None, timeout=600, check=True):
    # Output goes to files, not pipes: a process killed mid-save may leave checkpoint writer
    # processes behind holding inherited pipes open. Its whole session is cleaned up after.
    import tempfile

    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=fo, stderr=fe, text=True, env=env or _env(),
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        fo.seek(0)
        fe.seek(0)
        out = subprocess.CompletedProcess(args, proc.returncode, fo.read(), fe.read())
    if check:
        assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def _pretrain(*args, **kw):
    return _run([PY, "-m", "megatron_rwkvx.pretrain", *map(str, args)], **kw)


def _losses(text):
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"iteration\s+(\d+)/\d+ \| loss (\S+)", text)}


def _val(text):
    vals = re.findall(r"validation at iteration \d+ \| loss (\S+)", text)
    return float(vals[-1])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    _run([PY, "tools/make_sample_corpus.py", "--output", str(d / "corpus"), "--num-docs", "150"])
    _run([PY, "tools/preprocess_data.py", "--input", str(d / "corpus" / "text.jsonl"),
          "--output-prefix", str(d / "sample"), "--append-eod", "--workers", "1"])
    return str(d / "sample_text_document")


def _base(data, iters, *extra):
    return [*MODEL, "--data-path", data, "--split", "90,10,0", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", str(iters),
            "--log-interval", "1", "--device", "cpu", *extra]


def test_loss_falls_and_logs(data, tmp_path):
    out = _pretrain(*_base(data, 12, "--lr", "5e-3", "--eval-iters", "1", "--eval-interval", "6",
                          "--tensorboard-dir", tmp_path / "tb"))
    losses = [float(v) for _, v in sorted(_losses(out.stdout).items())]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    line = next(l for l in out.stdout.splitlines() if l.startswith("iteration"))
    for field in ("lr", "grad norm", "tokens/s", "TFLOP/s", "MFU", "rss", "ETA"):
        assert field in line
    assert "validation at iteration 6" in out.stdout
    # Once at start-up, which backend each operator of the model runs and why.
    assert out.stdout.count("wkv7: backend torch on cpu float32 (auto: the only candidate on cpu)") == 1
    assert "sparse-attention: backend" not in out.stdout  # the pattern has no sparse block
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_kill9_then_resume_logs_the_same_losses(data, tmp_path):
    args = _base(data, 8, "--lr", "3e-3", "--eval-iters", "0")
    whole = _losses(_pretrain(*args).stdout)
    ckpt = tmp_path / "ckpt"
    run = [PY, "-m", "megatron_rwkvx.pretrain", *map(str, args), "--save", str(ckpt), "--load", str(ckpt),
           "--save-interval", "3"]
    proc = subprocess.Popen(run, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env())
    seen = ""
    for line in proc.stdout:
        seen += line
        if re.search(r"iteration\s+5/8", line):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, seen[-2000:]
    resumed = _run(run)
    assert "resumed from" in resumed.stdout and "at iteration 3" in resumed.stdout
    again = _losses(resumed.stdout)
    assert sorted(again) == [4, 5, 6, 7, 8]
    for it, loss in again.items():
        assert loss == whole[it], (it, loss, whole[it])


def test_crash_mid_save_leaves_previous_checkpoint_loadable(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = _base(data, 6, "--eval-iters", "0", "--save", ckpt, "--load", ckpt, "--save-interval", "2")
    env = _env()
    env["MEGATRON_RWKVX_FAULT_BEFORE_LATEST"] = "4"
    crashed = _pretrain(*args, env=env, check=False)
    assert crashed.returncode == 17
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (ckpt / "iter_0000004").is_dir()  # the half-finished save is there, but not pointed to
    resumed = _pretrain(*args)
    assert "at iteration 2" in resumed.stdout
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "6"


def test_sigusr1_saves_and_exits_zero(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    run = [PY, "-m", "megatron_rwkvx.pretrain", *map(str, _base(data, 200, "--eval-iters", "0")),
           "--save", str(ckpt)]
    proc = subprocess.Popen(run, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env())
    out = ""
    for line in proc.stdout:
        out += line
        if re.search(r"iteration\s+2/200", line):
            proc.send_signal(signal.SIGUSR1)
    proc.wait(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    m = re.search(r"exiting at iteration (\d+) \(signal\)", out)
    assert m, out[-2000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == m.group(1)


def _expanded_random_base(tmp_path):
    """A random two-block RWKV-7 expanded (zero-init) to RWKV-X, as a megatron checkpoint."""
    from megatron_rwkvx.config import RWKVXConfig
    from megatron_rwkvx.testing.checkpoints import random_official_state_dict

    base = tmp_path / "base.pth"
    torch.save(random_official_state_dict(RWKVXConfig(hidden_size=64, head_size=16, num_layers=2), 1), base)
    expanded = tmp_path / "expanded"
    _run([PY, "tools/convert_rwkv7_to_rwkvx.py", "--input", str(base), "--output", str(expanded),
          "--num-sparse-blocks", "1", "--output-format", "megatron"])
    return expanded


def test_stage1_freezes_the_base_bit_for_bit(data, tmp_path):
    expanded = _expanded_random_base(tmp_path)
    trained = tmp_path / "stage1"
    _pretrain("--init-from", expanded, "--train-only", "sparse", "--data-path", data, "--split", "90,10,0",
              "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "3", "--lr", "1e-2",
              "--eval-iters", "0", "--sparse-chunk-size", "8", "--sparse-top-k", "2",
              "--device", "cpu", "--save", trained)
    before, after = tmp_path / "before.pth", tmp_path / "after.pth"
    for src, dst in ((expanded, before), (trained, after)):
        _run([PY, "tools/export_checkpoint.py", "--load", str(src), "--output", str(dst), "--dtype", "fp32"])
    a, b = torch.load(before, weights_only=True), torch.load(after, weights_only=True)
    frozen = [k for k in a if not k.startswith("moba.")]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("moba."))


def test_rwkv_fade_in_silences_the_base_then_brings_it_back(data, tmp_path):
    expanded = _expanded_random_base(tmp_path)
    common = ["--init-from", expanded, "--train-only", "sparse", "--data-path", data, "--split", "90,10,0",
              "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "4", "--lr", "1e-2",
              "--eval-iters", "0", "--sparse-chunk-size", "8", "--sparse-top-k", "2", "--log-interval", "1",
              "--device", "cpu"]
    plain = _losses(_pretrain(*common).stdout)
    faded = _pretrain(*common, "--rwkv-fade-in", "1", "3").stdout
    assert re.findall(r"rwkv gate (\S+)", faded) == ["0.000", "0.500", "1.000", "1.000"]
    # the first step trains beside silenced RWKV-7 blocks: another model, another loss
    assert _losses(faded)[1] != plain[1]
    ckpt = tmp_path / "ckpt"
    stopped = _pretrain(*common, "--rwkv-fade-in", "1", "3", "--save", ckpt, "--exit-interval", "2").stdout
    assert "saved during --rwkv-fade-in (RWKV-7 gate 0.500 < 1)" in stopped
    other = _pretrain(*common, "--save", ckpt, "--load", ckpt, check=False)  # the schedule forgotten
    assert other.returncode != 0 and "during --rwkv-fade-in 1 3" in other.stdout + other.stderr
    assert "pass --rwkv-fade-in 1 3 to finish that schedule" in other.stdout + other.stderr
    resumed = _pretrain(*common, "--rwkv-fade-in", "1", "3", "--save", ckpt, "--load", ckpt).stdout
    assert {**_losses(stopped), **_losses(resumed)} == _losses(faded)  # the gate follows the iteration
    assert "saved during --rwkv-fade-in" not in resumed


@pytest.mark.distributed
def test_tp2_checkpoint_gives_the_same_validation_loss_at_tp1(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = _base(data, 2, "--eval-iters", "2", "--eval-interval", "2", "--save", ckpt)
    tp2 = _run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29617",
                "-m", "megatron_rwkvx.pretrain", *map(str, args), "--tensor-model-parallel-size", "2",
                "--sequence-parallel"])
    tp1 = _pretrain(*_base(data, 2, "--eval-iters", "2", "--load", ckpt, "--skip-train"))
    assert "checkpoint layout" in tp1.stdout  # the per-rank RNG files are skipped, and it says so
    a, b = _val(tp2.stdout), _val(tp1.stdout)
    assert abs(a - b) / abs(b) < 1e-5, (a, b)


@pytest.mark.distributed
def test_distributed_optimizer_resumes_exactly(data, tmp_path):
    """DP2 with the distributed optimizer: stop after a save at iteration 2, resume at DP2 and at DP1:
    the losses of iterations 3-4 equal the uninterrupted run's (Adam's moments and step count come
    back). A TP change of that DP-reshardable save is refused with the fix named."""
    args = [*_base(data, 4, "--lr", "3e-3", "--eval-iters", "0"), "--global-batch-size", "4",
            "--use-distributed-optimizer"]

    def dp2(port, *extra, check=True):
        return _run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
                     "-m", "megatron_rwkvx.pretrain", *map(str, args), *map(str, extra)], check=check)

    whole = _losses(dp2(29641).stdout)
    ckpt = tmp_path / "ckpt"
    first = _losses(dp2(29642, "--save", ckpt, "--save-interval", 2, "--exit-interval", 2).stdout)
    assert sorted(first) == [1, 2] and all(first[i] == whole[i] for i in first)
    for resumed in (dp2(29643, "--load", ckpt), _pretrain(*args, "--load", ckpt)):
        assert "resumed from" in resumed.stdout and "at iteration 2" in resumed.stdout
        again = _losses(resumed.stdout)
        assert sorted(again) == [3, 4]
        for it, loss in again.items():
            assert loss == whole[it], (it, loss, whole[it])
    refused = dp2(29644, "--load", ckpt, "--tensor-model-parallel-size", 2, check=False)
    assert refused.returncode != 0 and "saved DP-reshardable at TP=1" in refused.stderr
    assert "--no-load-optim" in refused.stderr
    plain = _pretrain(*_base(data, 4, "--eval-iters", "0"), "--load", ckpt, check=False)
    assert plain.returncode == 2 and "with --use-distributed-optimizer" in plain.stderr


def _saved_tensors(iteration_dir):
    """Every tensor of a dist_checkpointing save (weights and optimizer state), read without a model."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = iteration_dir.parent / f"{iteration_dir.name}.pt"
    dcp_to_torch_save(str(iteration_dir), str(flat))
    return {k: v for k, v in torch.load(flat, weights_only=False).items() if isinstance(v, torch.Tensor)}


@pytest.mark.distributed
def test_overlapped_param_gather_trains_as_the_plain_all_gather(data, tmp_path):
    """DP2 with the distributed optimizer: --overlap-param-gather (the all-gather of the updated
    parameter shards started by the next forward's pre-hooks, and forced before evaluations and
    saves) gives the same losses, validation losses and saved weights and optimizer state, bit for
    bit, as the all-gather at the end of each step. Two micro-batches per step, a sparse block."""
    args = [*_base(data, 4, "--lr", "3e-3", "--eval-iters", "1", "--eval-interval", "2",
                   "--save-interval", "2"), "--layer-pattern", "RRA", "--sparse-chunk-size", "16",
            "--sparse-top-k", "2", "--global-batch-size", "8", "--use-distributed-optimizer",
            "--overlap-grad-reduce"]
    outs = {}
    for port, extra in ((29652, ()), (29653, ("--overlap-param-gather",))):
        ckpt = tmp_path / ("overlapped" if extra else "plain")
        out = _run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
                    "-m", "megatron_rwkvx.pretrain", *map(str, args), "--save", str(ckpt), *extra])
        outs[bool(extra)] = (_losses(out.stdout), re.findall(r"validation at iteration \d+ \| loss \S+", out.stdout),
                             {it: _saved_tensors(ckpt / f"iter_{it:07d}") for it in (2, 4)})
    (plain_losses, plain_val, plain_saved), (losses, val, saved) = outs[False], outs[True]
    assert sorted(losses) == [1, 2, 3, 4] and losses == plain_losses
    assert len(val) == 2 and val == plain_val
    for it in (2, 4):
        assert saved[it].keys() == plain_saved[it].keys() and len(saved[it]) > 50
        different = [k for k in saved[it] if not torch.equal(saved[it][k], plain_saved[it][k])]
        assert not different, (it, different[:5])


@pytest.mark.distributed
def test_two_node_launch_simulated_on_loopback(data):
    """Two torchrun agents with --nnodes 2, as the sbatch script's torchrun mode starts them."""
    args = [*map(str, _base(data, 2, "--eval-iters", "0", "--global-batch-size", "4"))]
    procs = [
        subprocess.Popen(
            [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", "29633",
             "-m", "megatron_rwkvx.pretrain", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for node in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    text = outs[0][0] + outs[1][0]
    assert "dp=2" in text and "iteration       2/2" in text


def test_bad_inputs_fail_before_training(data, tmp_path):
    small_vocab = _pretrain(*_base(data, 2, "--eval-iters", "0", "--vocab-size", "1000"), check=False)
    assert small_vocab.returncode != 0 and "65536" in small_vocab.stderr and "vocabulary" in small_vocab.stderr
    bad = tmp_path / "hf.pth"
    torch.save({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}, bad)
    other = _pretrain("--init-from", bad, "--data-path", data, "--seq-length", "32", "--train-iters", "1",
                      "--device", "cpu", "--eval-iters", "0", check=False)
    assert other.returncode != 0 and "Hugging Face" in other.stderr
    missing = _pretrain(*[a if a != data else str(tmp_path / "nope") for a in _base(data, 1)], check=False)
    assert missing.returncode != 0 and "nope" in missing.stderr
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    if not HAVE_APEX_OR_TE:  # megatron-core cannot load that format into torch's Adam: refuse up front
        fully = _pretrain(*_base(data, 1), "--use-distributed-optimizer",
                          "--dist-ckpt-optim-fully-reshardable", check=False)
        assert fully.returncode == 2 and "needs Transformer Engine or Apex" in fully.stderr


def test_launchers_parse_and_dry_run():
    for script in ("train_stage1.sh", "train_stage2.sh", "train_cpu_demo.sh"):
        _run(["bash", "-n", f"examples/{script}"])
    env = _env()
    env["DRY_RUN"] = "1"
    s1 = _run(["bash", "examples/train_stage1.sh"], env=env).stdout
    assert "srun" in s1 and "megatron_rwkvx.pretrain" in s1
    for flag in ("--train-only sparse", "--seq-length 1024", "--lr 1e-5", "--adam-eps 1e-18", "--bf16"):
        assert flag in s1
    s2 = _run(["bash", "examples/train_stage2.sh"], env=env).stdout
    assert "--seq-length 65536" in s2 and "--context-parallel-size 4" in s2 and "nodes=8" in s2
    env["PHASE"], env["LAUNCHER"] = "longce", "torchrun"
    lce = _run(["bash", "examples/train_stage2.sh"], env=env).stdout
    assert "--loss longce" in lce and "torch.distributed.run" in lce and "--rdzv-endpoint" in lce
    assert "--context-parallel-size 4" in lce  # LongCE keeps context parallelism
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in s2
    env.update(CONTAINER_IMAGE="/shared/rwkvx.sqsh", CONTAINER_MOUNTS="/data:/data")
    boxed = _run(["bash", "examples/train_stage2.sh"], env=env).stdout
    assert "--container-image=/shared/rwkvx.sqsh" in boxed and "--container-mounts=/data:/data" in boxed
    for script in ("train_stage1.sh", "train_stage2.sh"):
        text = (ROOT / "examples" / script).read_text()
        # Slurm opens the log before the script runs: no folder the script would have to make.
        assert "#SBATCH --output=%x-%j.out" in text and "logs/" not in text
        assert f"sbatch examples/{script}" in text and "##SBATCH --partition=" in text


@pytest.mark.slow
def test_readme_main_job_in_test_size(tmp_path):
    env = _env()
    env.update(DEMO_SIZE="test", OUT=str(tmp_path / "demo"), DEMO_PORT="29651")
    out = _run(["bash", "examples/train_cpu_demo.sh"], env=env, timeout=1200)
    assert "=== done ===" in out.stdout
    assert "| depth |" in (tmp_path / "demo" / "passkey" / "passkey.md").read_text()
    assert (tmp_path / "demo" / "passkey" / "passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import megatron_rwkvx

    model = megatron_rwkvx.load_pretrained(str(tmp_path / "demo" / "rwkvx-tiny.pth"),
                                           sparse_chunk_size=32, sparse_top_k=2)
    assert model.config.layer_pattern == "RRARRA"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]]))).all()
