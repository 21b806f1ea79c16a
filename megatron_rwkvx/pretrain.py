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
    """The exception types that mean "the run was asked for something impossible", not a bug."""
    from megatron_rwkvx.errors import INPUT_ERRORS

    return INPUT_ERRORS


def _check_init_from(path) -> None:
    """An --init-from that the loaders would only report after the model is built, or as plain
    ValueErrors: checked before any process group exists, so every rank refuses alike. (--load
    and --save are inspected by ``training.resume.plan_checkpoints``.)"""
    from megatron_rwkvx.checkpointing.megatron_format import LATEST_FILE, read_latest_iteration, read_model_config
    from megatron_rwkvx.training.arguments import ArgumentError

    if not os.path.exists(path):
        raise ArgumentError(f"--init-from {path} does not exist; give an RWKV-7/RWKV-X .pth or a "
                            "checkpoint directory")
    if not os.path.isdir(path):
        return
    try:
        iteration = read_latest_iteration(path)
        read_model_config(path)
    except (FileNotFoundError, ValueError) as err:  # CheckpointFormatError is a ValueError
        raise ArgumentError(f"--init-from {path}: {err}") from err
    if iteration is None:
        raise ArgumentError(
            f"--init-from {path}: no completed save in it ({LATEST_FILE} is missing); give a "
            "directory written by --save or by tools/convert_rwkv7_to_rwkvx.py --output-format megatron"
        )


def _report(err: BaseException) -> int:
    # One write per line: print() writes the text and its newline apart, and the ranks of one job
    # share stderr, so their refusals would run together on one line.
    sys.stderr.write(f"error: {err}\n")
    sys.stderr.flush()
    return 2


def main(argv=None) -> int:
    from megatron_rwkvx.training.arguments import parse_args

    input_errors = _input_errors()
    try:
        args = parse_args(argv)
    except input_errors as err:  # ArgumentError, and the checks argument validation borrows (recompute)
        return _report(err)
    import torch

    # Tear down only a process group this call set up: a caller's (a test, a notebook) stays.
    ours = not torch.distributed.is_initialized()
    try:
        if args.init_from:
            _check_init_from(args.init_from)
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
elif __name__ == "__mp_main__":
    # A process that multiprocessing spawned for a run imports the run's main module under this
    # name: dist_checkpointing's result-queue manager does, which outlived a kill -9 of the run.
    from megatron_rwkvx.training.initialize import spawned_child

    spawned_child()
