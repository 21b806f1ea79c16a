"""Resume policy: what a run does with --load and --save, decided before any training work.

Which checkpoint a run continues, and what it refuses so that it never destroys another run's
checkpoints: a --load that is a file or names a missing iteration, a --load or --save of another
architecture, a --save holding a checkpoint newer than where the run starts (unless the run resumes
that very directory), or a damaged iteration (``training.checkpoint_integrity``: named, with the
newest intact one; --ckpt-step picks an iteration, --auto-fallback takes the intact one); every
rank reads a share of the files of the iterations checked. The mechanism that writes and reads the sharded state is
``training.checkpointing``; the on-disk names are ``checkpointing.megatron_format``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Set, Tuple

import torch

from megatron_rwkvx.checkpointing.megatron_format import (
    LATEST_FILE,
    MODEL_CONFIG_FILE,
    check_architecture,
    is_complete_checkpoint,
    iteration_dir,
    read_latest_iteration,
    read_model_config,
    saved_iterations,
)
from megatron_rwkvx.checkpointing.official_format import CheckpointFormatError
from megatron_rwkvx.training.arguments import ArgumentError
from megatron_rwkvx.checkpointing import manifest
from megatron_rwkvx.training.checkpoint_integrity import (
    Verify,
    fallback_advice,
    iteration_damage,
    newest_intact_iteration,
    shared_damage,
)


@dataclass
class CheckpointPlan:
    """What this run does with --load and --save, decided before any training work."""

    resume_iteration: Optional[int] = None  # the --load iteration this run continues; None: scratch
    # --save is the directory the run resumed from (or was to resume from): its saves up to
    # ``inherited`` and its interrupted saves are this run's own history, not another run's.
    continues_save_dir: bool = False
    inherited: int = -1
    written: Set[int] = field(default_factory=set)


def _newest_checkpoint(directory: str) -> Optional[int]:
    newest = read_latest_iteration(directory)
    for i in saved_iterations(directory):
        if (newest is None or i > newest) and is_complete_checkpoint(iteration_dir(directory, i)):
            newest = i
    return newest


def _resume_intact(args, load: str, latest: int, warnings: List[str],
                   verify: Verify) -> Tuple[int, Optional[str]]:
    """Verify the iteration a resume would load: (iteration to load, error message or None)."""
    problem, note = iteration_damage(load, latest, verify)
    if note:
        warnings.append(note)
    if problem is None:
        return latest, None
    fallback = newest_intact_iteration(load, below=latest, verify=verify)
    if args.auto_fallback and fallback is not None:
        warnings.append(
            f"WARNING: --auto-fallback: iteration {latest} of {load} is damaged ({problem}); "
            f"resuming from iteration {fallback}, the newest intact one: iterations {fallback + 1}"
            f"-{latest} are trained again")
        return fallback, None
    return latest, (f"--load {load}: iteration {latest} is damaged or incomplete: {problem}; "
                    + fallback_advice(load, fallback))


def _inspect_directories(args, cfg, verify: Verify = manifest.damage):
    """Rank 0's verdict on --load/--save: (plan, error message or None, warnings). ``verify``
    checks an iteration's files against its manifest."""
    plan, warnings = CheckpointPlan(), []
    load = args.load
    # A run that only evaluates never writes to --save.
    save = None if args.skip_train else args.save
    if load:
        if os.path.exists(load) and not os.path.isdir(load):
            return plan, (
                f"--load {load} is a file; --load resumes a training checkpoint directory (one "
                f"written by --save, holding {LATEST_FILE}). To start from the weights of a model "
                f"file use --init-from {load}"), warnings
        try:
            latest = read_latest_iteration(load) if os.path.isdir(load) else None
        except ValueError as err:
            return plan, f"--load {load}: {err}", warnings
        if args.ckpt_step is not None:  # Megatron-LM's override of the pointer
            if not os.path.isdir(iteration_dir(load, args.ckpt_step)):
                saved = saved_iterations(load) if os.path.isdir(load) else []
                return plan, (f"--ckpt-step {args.ckpt_step}: {iteration_dir(load, args.ckpt_step)} "
                              f"does not exist; saved iterations in {load}: {saved or 'none'}"), warnings
            latest = args.ckpt_step
        if latest is None:
            warnings.append(f"warning: no checkpoint in {load}: starting from scratch")
        else:
            if not os.path.isdir(iteration_dir(load, latest)):
                return plan, (f"--load {load}: {LATEST_FILE} names iteration {latest} but "
                              f"{iteration_dir(load, latest)} is missing; point {LATEST_FILE} at a "
                              "saved iteration, or remove it to start from scratch"), warnings
            try:
                check_architecture(read_model_config(load), cfg, load)
            except (CheckpointFormatError, FileNotFoundError, ValueError) as err:  # ValueError: bad JSON
                return plan, f"--load {load}: {err}", warnings
            latest, error = _resume_intact(args, load, latest, warnings, verify)
            if error:
                return plan, error, warnings
            plan.resume_iteration = latest
    if save and os.path.exists(save) and not os.path.isdir(save):
        return plan, f"--save {save} is a file; give a directory for the checkpoints", warnings
    if save and os.path.isdir(save):
        if os.path.isfile(os.path.join(save, MODEL_CONFIG_FILE)):
            try:
                check_architecture(read_model_config(save), cfg, save)
            except CheckpointFormatError as err:
                return plan, (f"--save {save}: {err}\nOr choose another --save directory: saving "
                              "there would mix two models in one directory."), warnings
            except ValueError as err:  # bad JSON: whose checkpoints these are cannot be told
                return plan, (f"--save {save}: {MODEL_CONFIG_FILE} is unreadable ({err}); choose "
                              "another --save directory"), warnings
        if load and os.path.isdir(load) and os.path.samefile(load, save):
            # Its pointer is where this run resumes (or there is none): directories above it are
            # interrupted saves, or newer ones the user rolled back from on purpose.
            plan.continues_save_dir = True
            plan.inherited = -1 if plan.resume_iteration is None else plan.resume_iteration
        else:
            try:
                newest = _newest_checkpoint(save)
            except ValueError as err:
                return plan, f"--save {save}: {err}", warnings
            start = plan.resume_iteration or 0
            if newest is not None and newest > start:
                how = (f"resuming {load}" if plan.resume_iteration is not None
                       else f"no checkpoint in --load {load}" if load else "no --load")
                return plan, (
                    f"--save {save} already holds a checkpoint at iteration {newest}, newer than "
                    f"iteration {start} where this run starts ({how}); saving there would "
                    f"overwrite that run's checkpoints and move its {LATEST_FILE} back. To continue "
                    f"that run pass --load {save}; to start another, choose another --save "
                    "directory."), warnings
    return plan, None, warnings


def plan_checkpoints(args, cfg) -> CheckpointPlan:
    """Check --load and --save before any training work (raises ``ArgumentError``).

    Rank 0 looks at the directories and every rank acts on its verdict, so that all resume, warn
    or refuse alike even where they see the filesystem at different moments. Only reading the
    files of an iteration against its manifest is shared: whenever rank 0 needs an iteration
    checked it sends the others its directory and each rank reads a share of the files
    (``shared_damage``), so a resume does not wait for one process to read the whole checkpoint.
    (Checking exactly the files each rank loads is not possible here: which ranges of which
    shard files a rank reads is known only from its sharded state dict, after the model and the
    optimizer are built, and a changed layout reads parts of files whose checksums cover whole
    files; the choice of iteration, --auto-fallback's included, is needed before.)"""
    rank, failure = torch.distributed.get_rank(), None
    if rank != 0:
        while True:  # serve rank 0's requests until its verdict comes
            box = [None]
            torch.distributed.broadcast_object_list(box, src=0)
            kind, payload = box[0]
            if kind == _VERDICT:
                break
            shared_damage(payload)
    else:
        def verify(path: str) -> Optional[str]:
            torch.distributed.broadcast_object_list([(_CHECK, path)], src=0)
            return shared_damage(path)

        try:
            payload = _inspect_directories(args, cfg, verify)
        except Exception as err:  # the other ranks wait in the broadcast: tell them, then raise
            failure = err
            payload = (None, f"rank 0 could not inspect --load/--save: {err!r}", [])
        torch.distributed.broadcast_object_list([(_VERDICT, payload)], src=0)
    if failure is not None:
        raise failure
    plan, error, warnings = payload
    if rank == 0:
        for w in warnings:
            print(w, flush=True)
    if error:
        raise ArgumentError(error)
    return plan


# What rank 0 sends the others while it inspects --load/--save: an iteration to check together,
# then its verdict.
_CHECK, _VERDICT = "check", "verdict"
