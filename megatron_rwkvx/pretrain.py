"""Entry point: ``python -m megatron_rwkvx.pretrain [args]`` (one process per GPU, or per CPU rank).

Launch with torchrun (``torchrun --nproc-per-node 8 -m megatron_rwkvx.pretrain ...``) or srun with
one task per GPU; see ``examples/train_stage1.sh`` and ``examples/train_stage2.sh``.

Bad input (arguments, data files, tokenizer, model shape, checkpoints) ends a process with one
``error: <message>`` line on stderr and exit status 2; anything else keeps its traceback. Every
rank that meets the problem reports it, and in a multi-process job exits at once. Most input
checks run identically on every rank before the first collective that could wait on a failed
one. A problem only some ranks see (say, a data file missing on one node) ends those ranks; the
others are stopped by the launcher: torchrun stops the whole worker group when one worker exits
non-zero, and the Slurm launchers pass ``--kill-on-bad-exit=1`` to srun. Without such a launcher
the survivors wait in their next collective until it fails (gloo: as soon as the peer's
connection drops, with a traceback naming a crashed peer) or times out (30 min).
"""
from __future__ import annotations

import os
import sys


def _input_errors() -> tuple:
    """The exception types that mean "the run was asked for something impossible", not a bug:
    the project's ``UsageError`` family, and FileNotFoundError, which the loaders raise naming a
    path the user gave (a .pth, a checkpoint's model_config.json)."""
    from megatron_rwkvx.errors import UsageError

    return (UsageError, FileNotFoundError)


def _latest_iteration(flag: str, path: str, fresh_start_allowed: bool):
    """The iteration a checkpoint directory points at, read as the loaders will, with its
    model_config.json. None: no pointer, allowed only for a fresh start (an empty --load)."""
    from megatron_rwkvx.checkpointing.megatron_format import read_latest_iteration, read_model_config
    from megatron_rwkvx.training.arguments import ArgumentError

    try:
        iteration = read_latest_iteration(path)
        if iteration is not None or not fresh_start_allowed:
            read_model_config(path)
    except (FileNotFoundError, ValueError) as err:  # CheckpointFormatError is a ValueError
        raise ArgumentError(f"{flag} {path}: {err}") from err
    return iteration


def _check_before_launch(args) -> None:
    """Input problems that the loaders and the loop would report as plain ValueErrors (which
    cannot be told apart from bugs) or only after minutes of work: checked before any process
    group exists, so every rank refuses alike and none waits for another."""
    from megatron_rwkvx.checkpointing.megatron_format import LATEST_FILE, iteration_dir
    from megatron_rwkvx.data.datasets import parse_split
    from megatron_rwkvx.training.arguments import ArgumentError

    init = args.init_from
    if init and not os.path.exists(init):
        raise ArgumentError(f"--init-from {init} does not exist; give an RWKV-7/RWKV-X .pth or a "
                            "checkpoint directory")
    if init and os.path.isdir(init) and _latest_iteration("--init-from", init, False) is None:
        raise ArgumentError(
            f"--init-from {init}: no completed save in it ({LATEST_FILE} is missing); give a "
            "directory written by --save or by tools/convert_rwkv7_to_rwkvx.py --output-format megatron"
        )
    if args.load and os.path.isdir(args.load):
        iteration = _latest_iteration("--load", args.load, True)
        if iteration is not None and not os.path.isdir(iteration_dir(args.load, iteration)):
            raise ArgumentError(
                f"--load {args.load}: {LATEST_FILE} names iteration {iteration}, but "
                f"{iteration_dir(args.load, iteration)} is missing; point {LATEST_FILE} at a saved "
                "iteration, or remove it to start from scratch"
            )

    train, valid, _ = parse_split(args.split)
    for name, share, needed in (("train", train, True), ("valid", valid, args.eval_iters > 0)):
        if needed and share <= 0:
            raise ArgumentError(
                f"--split {args.split!r} leaves the {name} split empty; give it a share"
                + (", or set --eval-iters 0 to train without validation" if name == "valid" else "")
            )


def _report(err: BaseException) -> int:
    print(f"error: {err}", file=sys.stderr, flush=True)
    return 2


def main(argv=None) -> int:
    from megatron_rwkvx.training.arguments import ArgumentError, parse_args

    try:
        args = parse_args(argv)
    except ArgumentError as err:
        return _report(err)
    input_errors = _input_errors()
    import torch

    # Tear down only a process group this call set up: a caller's (a test, a notebook) stays.
    ours = not torch.distributed.is_initialized()
    try:
        _check_before_launch(args)
        from megatron_rwkvx.training.loop import pretrain

        return pretrain(args)
    except input_errors as err:
        # The loop's own checks (tokenizer, model shape, data files, checkpoints) end here on
        # every rank that made them; the module docstring says what happens to the other ranks.
        code = _report(err)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # Leave now: interpreter shutdown takes seconds, and a peer that meanwhile fails in a
            # collective with this rank would be what the launcher reports as the root cause.
            sys.stdout.flush()
            os._exit(code)
        return code
    finally:
        if ours and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
