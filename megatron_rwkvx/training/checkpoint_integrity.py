"""Whether a saved iteration is intact: its manifest (``checkpointing.manifest``) against the files,
and the way back from a damaged one. Shared by the resume policy (``training.resume``: which
iteration to load) and the loader (``training.checkpointing``: naming a file that cannot be read).

Checking an iteration reads every byte of it. The functions take the checker (``verify``): by
default this process reads all the files; ``shared_damage`` splits them over the ranks of a job
(collective), so that a resume of a large model does not wait for one rank to read every shard.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

import torch

from megatron_rwkvx.checkpointing import manifest
from megatron_rwkvx.checkpointing.megatron_format import is_complete_checkpoint, iteration_dir, saved_iterations

# (an iteration's directory) -> what is wrong with its files against its manifest, or None.
Verify = Callable[[str], Optional[str]]


def shared_damage(path: str) -> Optional[str]:
    """``manifest.damage`` of ``path`` split over the ranks of the default group: each checks its
    share of the files, and every rank returns the same verdict (the problem found by the lowest
    rank that found one). Collective: every rank must call it, for the same ``path``."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        mine = manifest.damage(path, rank, world)
    except Exception as err:  # this rank must still answer the gather, or the others wait forever
        mine = f"{path}: rank {rank} could not check its files ({type(err).__name__}: {err})"
    found: List[Optional[str]] = [None] * world
    torch.distributed.all_gather_object(found, mine)
    return next((problem for problem in found if problem is not None), None)


def iteration_damage(directory: str, iteration: int,
                     verify: Verify = manifest.damage) -> Tuple[Optional[str], Optional[str]]:
    """(what is wrong with saved ``iteration`` of ``directory``, naming the file, or None; a note
    or None). Without a manifest an iteration was saved by an earlier version (which wrote none:
    loaded unverified) unless an older iteration of the directory has one (then its save was cut
    short)."""
    path = iteration_dir(directory, iteration)
    if not os.path.isdir(path):
        return f"{path} is missing", None
    if manifest.has_manifest(path):
        return verify(path), None
    if not is_complete_checkpoint(path):
        return (f"{path} is an incomplete save (no {manifest.MANIFEST_FILE}, and dist_checkpointing's "
                "metadata.json is missing or unreadable)"), None
    if any(manifest.has_manifest(iteration_dir(directory, i)) for i in saved_iterations(directory) if i < iteration):
        return f"{path} has no {manifest.MANIFEST_FILE}: its save was cut short", None
    return None, (f"note: {path} has no {manifest.MANIFEST_FILE} (saved by an earlier version): its "
                  "files are not verified")


def newest_intact_iteration(directory: str, below: int, verify: Verify = manifest.damage) -> Optional[int]:
    """The newest saved iteration of ``directory`` older than ``below`` whose files are intact."""
    for i in reversed(saved_iterations(directory)):
        if i < below and iteration_damage(directory, i, verify)[0] is None:
            return i
    return None


def damaged_checkpoint_advice(directory: str, iteration: int, verify: Verify = manifest.damage) -> str:
    """The way back from a damaged ``iteration``: the newest intact earlier one, and how to load it."""
    return fallback_advice(directory, newest_intact_iteration(directory, below=iteration, verify=verify))


def fallback_advice(directory: str, fallback: Optional[int]) -> str:
    """``damaged_checkpoint_advice`` once the newest intact earlier iteration is known."""
    if fallback is None:
        return (f"no earlier iteration in {directory} is intact: restore the files from a backup, "
                "or start from scratch with another --save directory")
    return (f"the newest intact earlier iteration is {fallback}: pass --ckpt-step {fallback} to "
            "resume from it (--auto-fallback does so unattended)")
