"""Checkpoint directories are never lost or silently ignored: a run that does not continue a
--save directory's run is refused before it writes there, a --load that finds nothing says so, a
stage-1 checkpoint names the flag it needs, and throughput counts training steps only."""
import re
import shutil
import textwrap
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

import test_training_system as system

PY = system.PY
data = system.data  # its tokenized sample corpus (module-scoped: built once for this file)
LATEST = "latest_checkpointed_iteration.txt"
MODEL = ["--hidden-size", "64", "--head-size", "16", "--layer-pattern", "RRAR",
         "--sparse-chunk-size", "16", "--sparse-top-k", "2"]


def _args(data, iters, *extra, model=MODEL):
    return [*model, "--data-path", data, "--split", "90,10,0", "--seq-length", "64",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", iters,
            "--lr", "1e-3", "--eval-iters", "0", "--log-interval", "1", "--device", "cpu", *extra]


def _env():
    return system._env()  # with a free MASTER_PORT of its own


def _pretrain(data, iters, *extra, check=True, model=MODEL):
    return system._pretrain(*_args(data, iters, *extra, model=model), env=_env(), check=check)


def _snapshot(directory):
    """Every file under ``directory`` with its size and modification time (a rewrite changes it)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _iter_dirs(directory):
    return sorted(p.name for p in directory.glob("iter_*"))


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    """A stage-1 run's --save directory: iter_0000002 and iter_0000004, the pointer at 4."""
    ckpt = tmp_path_factory.mktemp("stage1") / "ckpt"
    _pretrain(data, 4, "--train-only", "sparse", "--save", ckpt, "--save-interval", 2)
    assert _iter_dirs(ckpt) == ["iter_0000002", "iter_0000004"]
    return ckpt


@pytest.fixture
def copy_stage1(stage1, tmp_path):
    def make(name):
        return shutil.copytree(stage1, tmp_path / name)
    return make


@pytest.fixture(scope="module")
def runs(data, stage1, tmp_path_factory):
    """The single-process runs of the tests below, set up first and then run two at a time (each
    is mostly interpreter and import start-up): the directories, their files before, the outputs."""
    d = tmp_path_factory.mktemp("runs")

    def copy(name, pointer=None):
        path = shutil.copytree(stage1, d / name)
        if pointer is not None:
            (path / LATEST).write_text(str(pointer))
        return path

    paths = {
        "newer": copy("newer"),
        "rolled back": copy("rolled back", pointer=2),  # by hand; iter_0000004 stays
        "other run": copy("other run", pointer=2),
        "source": copy("source"),
        "other architecture": d / "other architecture",
        "pth": d / "model.pth",
        "typo": d / "typo_dir",
        "old format": copy("old format"),
    }
    shutil.rmtree(paths["other run"] / "iter_0000004")
    paths["other architecture"].mkdir()
    shutil.copy(stage1 / "model_config.json", paths["other architecture"])  # layer pattern RRAR
    torch.save({}, paths["pth"])
    common = paths["old format"] / "iter_0000004" / "common.pt"
    state = torch.load(common, weights_only=False)
    state["layout"].pop("train_only", None)  # as saved by earlier versions
    torch.save(state, common)
    for manifest in paths["old format"].glob("iter_*/manifest.json"):  # which wrote none
        manifest.unlink()
    before = {name: _snapshot(paths[name]) for name in ("newer", "other run", "other architecture")}
    before["rolled back iter 4"] = _snapshot(paths["rolled back"] / "iter_0000004")

    p, sparse = paths, ("--train-only", "sparse")
    commands = {
        "fresh into newer": (2, "--save", p["newer"], "--save-interval", 1),
        "continue rolled back": (3, *sparse, "--load", p["rolled back"], "--save", p["rolled back"],
                                 "--keep-last-checkpoints", 1),
        "into another run's": (5, *sparse, "--load", p["source"], "--save", p["other run"],
                               "--keep-last-checkpoints", 1),
        "other architecture": (1, "--save", p["other architecture"], "--layer-pattern", "RRR"),
        "load a file": (1, "--load", p["pth"]),
        "load a typo": (1, "--load", p["typo"]),
        "stage 1 without --train-only": (5, "--load", stage1),
        "old format": (5, *sparse, "--load", p["old format"]),
    }
    with ThreadPoolExecutor(2) as pool:
        outs = pool.map(lambda args: _pretrain(data, *args, check=False), commands.values())
        out = dict(zip(commands, outs))
    return SimpleNamespace(paths=paths, before=before, out=out)


def _ok(out):
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _refused(out):
    assert out.returncode == 2, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert not re.search(r"iteration\s+\d+/", out.stdout)  # before any training
    return out.stderr


def test_fresh_run_refuses_a_save_dir_holding_newer_checkpoints(runs):
    ckpt = runs.paths["newer"]
    err = _refused(runs.out["fresh into newer"])
    assert "error: --save" in err and "iteration 4" in err and "iteration 0" in err
    assert f"--load {ckpt}" in err and "another --save directory" in err
    assert _snapshot(ckpt) == runs.before["newer"]


@pytest.mark.distributed
def test_refusal_is_the_same_on_every_rank(data, copy_stage1):
    # Resuming an older checkpoint from elsewhere is no better: it would move the pointer back too.
    ckpt, older = copy_stage1("ckpt"), copy_stage1("older")
    (older / LATEST).write_text("2")
    before = _snapshot(ckpt)
    args = _args(data, 6, "--train-only", "sparse", "--load", older, "--save", ckpt)
    out = system._run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29671",
                       "-m", "megatron_rwkvx.pretrain", *map(str, args)], timeout=180, check=False)
    assert out.returncode != 0
    refusals = re.findall(r"error: --save .*", out.stderr)
    assert len(refusals) == 2, out.stderr[-3000:]  # both ranks decided alike: none waits forever
    assert all("iteration 4" in r and f"iteration 2 where this run starts (resuming {older})" in r
               for r in refusals)
    assert _snapshot(ckpt) == before


@pytest.mark.distributed
def test_a_shard_damaged_in_rank_ones_share_is_refused_on_every_rank(data, copy_stage1):
    """The ranks share the checksums of a resume (training.resume): damage in a file only rank 1
    reads still stops both ranks, with the same error line and no traceback."""
    from megatron_rwkvx.checkpointing import manifest

    ckpt = copy_stage1("damaged")
    it = ckpt / "iter_0000004"
    shard = next(n for n in manifest.share(manifest.manifest_candidates(str(it)), 1, 2) if n.endswith(".distcp"))
    data_bytes = bytearray((it / shard).read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF  # same size: only the checksum tells
    (it / shard).write_bytes(bytes(data_bytes))
    args = _args(data, 6, "--train-only", "sparse", "--load", ckpt)
    out = system._run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29672",
                       "-m", "megatron_rwkvx.pretrain", *map(str, args)], timeout=180, check=False)
    # Each rank exits 2 with its error line; the only traceback is the launcher's, of the failure.
    assert out.returncode != 0 and "exitcode: 2" in out.stderr, out.stderr[-3000:]
    assert not re.search(r'File ".*megatron_rwkvx', out.stderr), out.stderr[-3000:]
    refusals = re.findall(r"error: --load .*", out.stderr)
    assert len(refusals) == 2 and refusals[0] == refusals[1], out.stderr[-3000:]
    assert f"{shard} does not hold what the save wrote" in refusals[0]
    assert "newest intact earlier iteration is 2: pass --ckpt-step 2" in refusals[0]
    assert not re.search(r"iteration\s+\d+/", out.stdout)  # before any training


def test_keep_last_deletes_only_this_runs_checkpoints(runs):
    # The pointer was rolled back by hand: the newer iter_0000004 is kept (Megatron-LM keeps it).
    ckpt = runs.paths["rolled back"]
    assert "at iteration 2" in _ok(runs.out["continue rolled back"]).stdout
    # iter_0000002 is the continued run's own and older than the last one: pruned as before.
    assert _iter_dirs(ckpt) == ["iter_0000003", "iter_0000004"]
    assert _snapshot(ckpt / "iter_0000004") == runs.before["rolled back iter 4"]
    assert (ckpt / LATEST).read_text() == "3"

    # Another run's older checkpoint in the --save directory of a run resumed from elsewhere.
    other = runs.paths["other run"]
    _ok(runs.out["into another run's"])
    assert _iter_dirs(other) == ["iter_0000002", "iter_0000005"]
    assert {k: v for k, v in _snapshot(other).items() if k.startswith("iter_0000002")} == {
        k: v for k, v in runs.before["other run"].items() if k.startswith("iter_0000002")}


def test_save_dir_of_another_architecture_is_refused(runs):
    err = _refused(runs.out["other architecture"])
    assert "another architecture" in err and "layer_pattern" in err
    assert "another --save directory" in err
    assert _snapshot(runs.paths["other architecture"]) == runs.before["other architecture"]


def test_load_of_a_file_is_refused(runs):
    pth = runs.paths["pth"]
    err = _refused(runs.out["load a file"])
    assert f"error: --load {pth} is a file" in err and f"--init-from {pth}" in err


def test_load_without_checkpoint_warns_and_starts_from_scratch(runs):
    out = _ok(runs.out["load a typo"])
    assert f"warning: no checkpoint in {runs.paths['typo']}: starting from scratch" in out.stdout
    assert re.search(r"iteration\s+1/1", out.stdout)


def test_stage1_checkpoint_names_the_train_only_flag(runs):
    err = _refused(runs.out["stage 1 without --train-only"])
    assert "--train-only sparse" in err and "--no-load-optim" in err
    assert "KeyError" not in err


def test_checkpoint_without_train_only_field_still_resumes(runs):
    out = _ok(runs.out["old format"])
    assert "resumed from" in out.stdout and "at iteration 4" in out.stdout
    assert "checkpoint layout" not in out.stdout  # same parallel layout: RNG states restored
    assert "iter_0000004 has no manifest.json (saved by an earlier version)" in out.stdout


_SLOW_EVAL_AND_SAVE = textwrap.dedent("""
    import sys, time
    from megatron_rwkvx.pretrain import main
    from megatron_rwkvx.training import checkpointing, loop

    def slow_first_call(fn):
        calls = []
        def wrapped(*a, **k):
            if not calls:
                time.sleep({pause})
            calls.append(1)
            return fn(*a, **k)
        return wrapped

    loop.evaluate = slow_first_call(loop.evaluate)
    checkpointing.save_checkpoint = slow_first_call(checkpointing.save_checkpoint)
    sys.exit(main(sys.argv[1:]))
""")


def test_throughput_excludes_evaluation_and_saves(data, tmp_path):
    pause = 2.5
    # A save after iteration 2 and an evaluation after 3 fall between logged iterations.
    args = _args(data, 4, "--eval-iters", "1", "--eval-interval", "3", "--save", tmp_path / "ckpt",
                 "--save-interval", "2")
    out = system._run([PY, "-c", _SLOW_EVAL_AND_SAVE.format(pause=pause), *map(str, args)], env=_env())
    rates = {int(m.group(1)): float(m.group(2).replace(",", ""))
             for m in re.finditer(r"iteration\s+(\d+)/4 \|.*?tokens/s ([\d,.]+)", out.stdout)}
    assert sorted(rates) == [1, 2, 3, 4], out.stdout[-3000:]
    tokens_per_iteration = 4 * 64
    for it, rate in rates.items():
        assert tokens_per_iteration / rate < pause / 2, (it, rate)
