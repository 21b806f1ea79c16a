"""Model checkpoints in megatron-core's ``dist_checkpointing`` format.

A directory in Megatron-LM's convention: ``latest_checkpointed_iteration.txt``, one
``iter_{N:07d}/`` per save, and ``model_config.json`` describing the model shape, so a checkpoint
saved with one tensor/pipeline layout loads into any other (sharded tensors carry global layer
numbers and tensor-parallel axes). The trainer adds optimizer/scheduler/RNG/data state to the same
directories.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional

import torch
from megatron.core import dist_checkpointing

from megatron_rwkvx.checkpointing.official_format import CheckpointFormatError
from megatron_rwkvx.config import MEAN_SELECTION, SPARSE_MODE

MODEL_CONFIG_FILE = "model_config.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"

# Config fields that define the architecture (what a checkpoint must agree on).
ARCH_FIELDS = (
    "hidden_size",
    "head_size",
    "vocab_size",
    "layer_pattern",
    "ffn_hidden_size",
    "decay_lora_dim",
    "a_lora_dim",
    "v_lora_dim",
    "gate_lora_dim",
    "num_query_groups",
    "sparse_chunk_size",
    "sparse_top_k",
    # The same weights compute another function with dense attention (the baseline).
    "attention_mode",
    # Extra parameters (the sparse blocks' token-shift mixes) and another function.
    "sparse_token_shift",
    # How the sparse blocks select chunks: a training choice, saved so that evaluation and the next
    # stage read the model as it was trained.
    "sparse_selection",
)

# Architecture fields newer than some saved configs, with the value those configs were written
# under: before attention_mode existed every A block ran top-k chunk attention, and before
# sparse_token_shift none had a token shift, and before sparse_selection every selection was by mean key.
FIELDS_ADDED_LATER = {"attention_mode": SPARSE_MODE, "sparse_token_shift": False, "sparse_selection": MEAN_SELECTION}
# Fields a later stage may change (check_architecture accepts a checkpoint that differs in them).
TRAINING_CHOICES = ("sparse_chunk_size", "sparse_top_k", "sparse_selection")


def with_later_fields(saved: Dict) -> Dict:
    """A saved architecture (model_config.json, a .pth's file config) with the fields its writer
    did not know yet, as that writer's model had them."""
    return {**FIELDS_ADDED_LATER, **saved}


def iteration_dir(directory: str, iteration: int) -> str:
    return os.path.join(directory, f"iter_{iteration:07d}")


def saved_iterations(directory: str) -> List[int]:
    """The iterations with an ``iter_{N:07d}`` directory in ``directory``, complete or not."""
    return sorted(
        int(m.group(1)) for d in os.listdir(directory) if (m := re.fullmatch(r"iter_(\d{7})", d))
    )


def is_complete_checkpoint(path: str) -> bool:
    """dist_checkpointing writes metadata.json last, once every rank's shards are on disk."""
    try:
        return dist_checkpointing.check_is_distributed_checkpoint(path)
    except (OSError, ValueError, TypeError):  # a metadata.json cut short by the crash
        return False


def architecture_of(cfg) -> Dict:
    return {name: getattr(cfg, name) for name in ARCH_FIELDS}


def read_model_config(directory: str) -> Dict:
    path = os.path.join(directory, MODEL_CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory} is not a megatron-rwkvx checkpoint directory ({MODEL_CONFIG_FILE} missing)"
        )
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointFormatError(f"{path} is not valid JSON ({exc}); the checkpoint directory is damaged") from exc
    return with_later_fields(saved)


def read_latest_iteration(directory: str) -> Optional[int]:
    path = os.path.join(directory, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        hint = (" ('release' marks a Megatron-LM release checkpoint, which this trainer cannot read: "
                "give a directory written by --save or tools/convert_rwkv7_to_rwkvx.py "
                "--output-format megatron)") if text == "release" else ""
        raise CheckpointFormatError(
            f"{path} is corrupt (expected an iteration number, found {text[:40]!r}){hint}"
        )
    return int(text)


def check_architecture(saved: Dict, cfg, directory: str) -> None:
    """Refuse a checkpoint of another architecture, naming every differing field."""
    current = architecture_of(cfg)
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs model {current[k]!r}"
        # A resume that forgets --attention-mode gets the default: name the flag that fixes it.
        + (f" (pass --attention-mode {saved[k]})" if k == "attention_mode" else "")
        + ((" (pass --sparse-token-shift)" if saved[k] else " (pass --no-sparse-token-shift)")
           if k == "sparse_token_shift" else "")
        for k in ARCH_FIELDS
        if k in saved and saved.get(k) != current[k]
        and k not in TRAINING_CHOICES
    ]
    if diffs:
        raise CheckpointFormatError(
            f"checkpoint {directory} is of another architecture:\n  " + "\n  ".join(diffs)
            + "\nMatch the model arguments to the checkpoint (see its model_config.json)."
        )


def write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model_checkpoint(model, cfg, directory: str, iteration: int = 0, extra_common: Optional[Dict] = None) -> str:
    """Save the model's sharded state (collective). The ``latest`` pointer moves only after the
    save completed, so a crash mid-save leaves the previous checkpoint loadable."""
    target = iteration_dir(directory, iteration)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        os.makedirs(target, exist_ok=True)
        write_text_atomic(
            os.path.join(directory, MODEL_CONFIG_FILE),
            json.dumps(architecture_of(cfg), indent=2, sort_keys=True),
        )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    state = {"model": model.sharded_state_dict()}
    if extra_common:
        state.update(extra_common)
    dist_checkpointing.save(state, target)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        write_text_atomic(os.path.join(directory, LATEST_FILE), str(iteration))
    return target


def load_model_checkpoint(model, cfg, directory: str, iteration: Optional[int] = None) -> int:
    """Load model weights saved with any tensor/pipeline layout; returns the iteration loaded."""
    check_architecture(read_model_config(directory), cfg, directory)
    if iteration is None:
        iteration = read_latest_iteration(directory)
        if iteration is None:
            raise FileNotFoundError(f"{directory} has no completed save ({LATEST_FILE} missing)")
    sharded = {"model": model.sharded_state_dict()}
    loaded = dist_checkpointing.load(sharded, iteration_dir(directory, iteration))
    model.load_state_dict(loaded["model"], strict=True)
    return iteration

