"""Whether a saved iteration is intact: its manifest (``checkpointing.manifest``) against the files,
and the way back from a damaged one. Shared by the resume policy (``training.resume``: which
iteration to load) and the loader (``training.checkpointing``: naming a file that cannot be read)."""
from __future__ import annotations

import os
from typing import Optional, Tuple

from megatron_rwkvx.checkpointing import manifest
from megatron_rwkvx.checkpointing.megatron_format import is_complete_checkpoint, iteration_dir, saved_iterations


def iteration_damage(directory: str, iteration: int) -> Tuple[Optional[str], Optional[str]]:
    """(what is wrong with saved ``iteration`` of ``directory``, naming the file, or None; a note
    or None). Without a manifest an iteration was saved by an earlier version (which wrote none:
    loaded unverified) unless an older iteration of the directory has one (then its save was cut
    short)."""
    path = iteration_dir(directory, iteration)
    if not os.path.isdir(path):
        return f"{path} is missing", None
    if manifest.has_manifest(path):
        return manifest.damage(path), None
    if not is_complete_checkpoint(path):
        return (f"{path} is an incomplete save (no {manifest.MANIFEST_FILE}, and dist_checkpointing's "
                "metadata.json is missing or unreadable)"), None
    if any(manifest.has_manifest(iteration_dir(directory, i)) for i in saved_iterations(directory) if i < iteration):
        return f"{path} has no {manifest.MANIFEST_FILE}: its save was cut short", None
    return None, (f"note: {path} has no {manifest.MANIFEST_FILE} (saved by an earlier version): its "
                  "files are not verified")


def newest_intact_iteration(directory: str, below: int) -> Optional[int]:
    """The newest saved iteration of ``directory`` older than ``below`` whose files are intact."""
    for i in reversed(saved_iterations(directory)):
        if i < below and iteration_damage(directory, i)[0] is None:
            return i
    return None


def damaged_checkpoint_advice(directory: str, iteration: int) -> str:
    """The way back from a damaged ``iteration``: the newest intact earlier one, and how to load it."""
    fallback = newest_intact_iteration(directory, below=iteration)
    if fallback is None:
        return (f"no earlier iteration in {directory} is intact: restore the files from a backup, "
                "or start from scratch with another --save directory")
    return (f"the newest intact earlier iteration is {fallback}: pass --ckpt-step {fallback} to "
            "resume from it (--auto-fallback does so unattended)")
