"""Official-layout checkpoint files (``.pth`` and the config beside it) as models:
``load_pretrained`` (a single-process model, ready for inference) and
``save_pretrained_as_megatron`` (a megatron checkpoint directory at iteration 0)."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Union

import torch

from megatron_rwkvx.checkpointing.megatron_format import ARCH_FIELDS, save_model_checkpoint, with_later_fields
from megatron_rwkvx.checkpointing.official_format import (
    OFFICIAL_RWKV7,
    REFERENCE_RWKVX,
    CheckpointFormatError,
    config_kwargs_from_state_dict,
    has_sparse_token_shift,
    import_state_dict,
    load_state_dict_file,
)
from megatron_rwkvx.config import ATTENTION_SYMBOL, RWKV_SYMBOL, RWKVXConfig, default_pattern
from megatron_rwkvx.models.rwkvx_model import RWKVXModel
from megatron_rwkvx.parallel.state import ensure_single_process_parallel_state


def prepare_runtime(device: torch.device) -> None:
    """What a single-process model needs: the CPU runtime shim on a machine without a GPU, and
    a one-process gloo world with megatron's groups."""
    if device.type == "cpu" and not torch.cuda.is_available():
        from megatron_rwkvx import cpu_runtime  # deferred: GPU processes never import the shim

        cpu_runtime.enable()
    ensure_single_process_parallel_state()


# The official .pth layouts hold tensors only; what the tensors cannot tell (the position of the
# sparse blocks, grouped-query heads, chunk size, top-k, chunk selection, attention mode) travels in a JSON file
# beside the .pth, written by tools/export_checkpoint.py, so that other RWKV loaders still read the .pth unchanged.
FILE_CONFIG_SUFFIX = ".json"
_FILE_CONFIG_TAG = "megatron_rwkvx_file_config"


def file_config_path(path: str) -> str:
    """The config file that accompanies the ``.pth`` at ``path`` (``rwkvx.pth`` -> ``rwkvx.pth.json``)."""
    return path + FILE_CONFIG_SUFFIX


def write_file_config(path: str, architecture: dict) -> str:
    """Write the architecture fields (``megatron_format.ARCH_FIELDS``) beside the ``.pth`` at ``path``."""
    target = file_config_path(path)
    tmp = target + ".partial"
    with open(tmp, "w") as f:
        json.dump({_FILE_CONFIG_TAG: 1, **architecture}, f, indent=1, sort_keys=True)
    os.replace(tmp, target)
    return target


def read_file_config(path: str) -> Optional[dict]:
    """The architecture fields stored beside ``path``, or None when there is no such file."""
    target = file_config_path(path)
    if not os.path.isfile(target):
        return None
    try:
        with open(target) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"{target} (the config beside {path}) is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get(_FILE_CONFIG_TAG) != 1:
        raise CheckpointFormatError(
            f"{target} sits beside {path} but is not a megatron-rwkvx file config (no "
            f"{_FILE_CONFIG_TAG!r} entry); move it away or re-export the checkpoint"
        )
    return with_later_fields({k: v for k, v in data.items() if k in ARCH_FIELDS})


def config_from_file_state_dict(sd, file_config: Optional[dict] = None, **overrides) -> tuple:
    """(config, layout) describing the model stored in an official-layout state dict.

    Shapes come from the tensors; ``file_config`` (``read_file_config``) supplies what they cannot
    tell and must agree with them. Without it an RWKV-X file gets the reference interleaving and
    the config defaults for chunk size and top-k. ``overrides`` win over both."""
    if any(k.startswith("moba.") for k in sd):
        layout = REFERENCE_RWKVX
        kwargs = config_kwargs_from_state_dict(sd, layout)
        num_sparse = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("moba."))
        kwargs["sparse_token_shift"] = has_sparse_token_shift(sd, layout)
    else:
        layout = OFFICIAL_RWKV7
        kwargs = config_kwargs_from_state_dict(sd, layout)
        num_sparse = 0
    num_rwkv = kwargs.pop("_num_rwkv")
    if file_config:
        _apply_file_config(kwargs, file_config, num_rwkv, num_sparse)
    elif "layer_pattern" not in overrides:
        # The reference interleaving exists only for some block counts: an explicit pattern is
        # the way to load the others, so it must not be computed first.
        kwargs["layer_pattern"] = default_pattern(num_rwkv, num_sparse)
    kwargs.update(overrides)
    return kwargs, layout


def _apply_file_config(kwargs: dict, file_config: dict, num_rwkv: int, num_sparse: int) -> None:
    clashes = [
        f"{k}: config file {file_config[k]!r} vs weights {v!r}"
        for k, v in kwargs.items() if k in file_config and file_config[k] != v
    ]
    pattern = file_config.get("layer_pattern")
    if pattern is not None and (pattern.count(RWKV_SYMBOL), pattern.count(ATTENTION_SYMBOL)) != (num_rwkv, num_sparse):
        clashes.append(
            f"layer_pattern: config file {pattern!r} has {pattern.count(RWKV_SYMBOL)} RWKV and "
            f"{pattern.count(ATTENTION_SYMBOL)} sparse blocks vs weights {num_rwkv} and {num_sparse}"
        )
    if clashes:
        raise CheckpointFormatError(
            "the config file beside the checkpoint does not describe its weights ("
            + "; ".join(clashes) + "); it belongs to another export: remove it or re-export"
        )
    kwargs.update(file_config)
    if pattern is None:
        kwargs["layer_pattern"] = default_pattern(num_rwkv, num_sparse)


def load_pretrained(
    path: str,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    **config_overrides,
):
    """Load a ``.pth`` checkpoint (official RWKV-7 layout, or the RWKV-X reference layout) into a
    single-process :class:`~megatron_rwkvx.models.rwkvx_model.RWKVXModel` in eval mode.

    The returned model maps token ids ``[B, T]`` to logits ``[B, T, vocab]``::

        model = megatron_rwkvx.load_pretrained("rwkv7-g1-0.1b.pth")
        logits = model(torch.tensor([[510, 3158, 8516]]))

    The file is read with ``torch.load(weights_only=True)``. On a machine without a GPU the CPU
    runtime shim is switched on, and a one-process gloo group is created if none exists.
    The architecture fields the tensors cannot tell (layer pattern, grouped-query heads, sparse
    chunk size, top-k and chunk selection, attention mode) are read from ``<path>.json`` when it exists (``tools/export_checkpoint.py``
    writes it); without it an RWKV-X file is taken as the reference interleaving.
    ``config_overrides`` set other config fields (e.g. ``sparse_chunk_size``, ``wkv_backend``;
    ``layer_pattern`` for an RWKV-X file whose sparse blocks are not interleaved as the reference).
    """
    device = torch.device(device)
    prepare_runtime(device)
    sd = load_state_dict_file(path)
    kwargs, layout = config_from_file_state_dict(sd, read_file_config(path), **config_overrides)
    cfg = RWKVXConfig(params_dtype=dtype, use_cpu_initialization=True, **kwargs)
    model = RWKVXModel(cfg, parallel_output=False)
    import_state_dict(model, sd, cfg, layout, path=path)
    model.to(device=device)
    model.eval()
    return model


def save_pretrained_as_megatron(file_state_dict: Dict[str, torch.Tensor], directory: str, **config_overrides) -> str:
    """Convert an official-layout state dict (RWKV-7 or RWKV-X) into a megatron checkpoint at
    iteration 0, in this process (one rank)."""
    prepare_runtime(torch.device("cpu"))
    kwargs, layout = config_from_file_state_dict(file_state_dict, **config_overrides)
    dtype = next(iter(file_state_dict.values())).dtype
    cfg = RWKVXConfig(params_dtype=dtype, use_cpu_initialization=True, **kwargs)
    model = RWKVXModel(cfg)
    import_state_dict(model, file_state_dict, cfg, layout)
    return save_model_checkpoint(model, cfg, directory, iteration=0)
