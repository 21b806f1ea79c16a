"""A resume verifies the iteration it loads with every rank reading a share of its files
(training.resume.plan_checkpoints), and all ranks reach one verdict: resume, fall back, or refuse."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from megatron_rwkvx.checkpointing import manifest
from megatron_rwkvx.checkpointing.megatron_format import LATEST_FILE, MODEL_CONFIG_FILE, architecture_of, iteration_dir
from megatron_rwkvx.config import RWKVXConfig
from megatron_rwkvx.testing.distributed import run_distributed

FILES = ("__0_0.distcp", "__1_0.distcp", "common.pt", "metadata.json", "rng_rank00000.pt", "rng_rank00001.pt")
# The shard rank 1 wrote; sorted, the files alternate between the two ranks, so rank 1 checks it.
RANK_ONE_SHARD = "__1_0.distcp"


def _cfg():
    return RWKVXConfig(hidden_size=64, head_size=16, layer_pattern="RA")


def _checkpoint(directory, iterations=(2, 4)):
    """A --save directory of two iterations with their manifests (file contents are not loaded)."""
    os.makedirs(directory)
    with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
        json.dump(architecture_of(_cfg()), f)
    for i in iterations:
        it = iteration_dir(directory, i)
        os.makedirs(it)
        for n, name in enumerate(FILES):
            with open(os.path.join(it, name), "wb") as f:
                f.write(bytes((n * 7 + i + k) % 256 for k in range(4096)))
        manifest.write_manifest(it, manifest.describe_files(it, manifest.manifest_candidates(it)))
    with open(os.path.join(directory, LATEST_FILE), "w") as f:
        f.write(str(iterations[-1]))
    return directory


def _plan_on_each_rank(rank, world, directories):
    from megatron_rwkvx.training.arguments import ArgumentError
    from megatron_rwkvx.training.resume import plan_checkpoints

    read = []
    describe = manifest._describe_one

    def spy(path, sync):
        read.append(os.path.relpath(path, os.path.dirname(os.path.dirname(path))))
        return describe(path, sync)

    manifest._describe_one = spy
    results = {}
    for case, (directory, fallback) in directories.items():
        read.clear()
        args = SimpleNamespace(load=directory, save=None, skip_train=False, ckpt_step=None, auto_fallback=fallback)
        try:
            results[case] = ("resume", plan_checkpoints(args, _cfg()).resume_iteration, sorted(read))
        except ArgumentError as err:
            results[case] = ("refused", str(err), sorted(read))
    return results


def _flip_a_byte(directory):
    """Damage rank 1's shard of iteration 4 so that its size still matches: only its checksum tells."""
    shard = os.path.join(iteration_dir(directory, 4), RANK_ONE_SHARD)
    with open(shard, "r+b") as f:
        f.seek(100)
        byte = f.read(1)[0]
        f.seek(100)
        f.write(bytes([byte ^ 0xFF]))
    return shard


@pytest.mark.distributed
def test_ranks_share_the_check_and_refuse_a_damaged_shard_alike(tmp_path):
    intact = _checkpoint(str(tmp_path / "intact"))
    damaged, fallback = (_checkpoint(str(tmp_path / name)) for name in ("damaged", "fallback"))
    shard = _flip_a_byte(damaged)
    _flip_a_byte(fallback)
    zero, one = run_distributed(_plan_on_each_rank, 2, {
        "intact": (intact, False), "damaged": (damaged, False), "fallback": (fallback, True)})

    every = sorted(f"iter_0000004/{n}" for n in FILES)
    assert zero["intact"][:2] == one["intact"][:2] == ("resume", 4)
    assert sorted(zero["intact"][2] + one["intact"][2]) == every  # each file read once, by one rank
    assert one["intact"][2] == [f"iter_0000004/{n}" for n in sorted(FILES)[1::2]]

    assert zero["damaged"][:2] == one["damaged"][:2]  # the same refusal on both ranks
    kind, message, _ = one["damaged"]
    assert kind == "refused" and message.startswith(f"--load {damaged}: iteration 4 is damaged or incomplete: ")
    assert f"{shard} does not hold what the save wrote" in message
    assert "the newest intact earlier iteration is 2: pass --ckpt-step 2" in message
    assert f"iter_0000004/{RANK_ONE_SHARD}" in one["damaged"][2]
    assert f"iter_0000004/{RANK_ONE_SHARD}" not in zero["damaged"][2]  # only rank 1 read it

    # --auto-fallback: both ranks resume the intact iteration 2 (checked together too).
    assert zero["fallback"][:2] == one["fallback"][:2] == ("resume", 2)
    assert sorted(zero["fallback"][2] + one["fallback"][2]) == sorted(
        every + [f"iter_0000002/{n}" for n in FILES])
