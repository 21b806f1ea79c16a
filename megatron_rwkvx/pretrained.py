"""``load_pretrained``: a single-process model from a checkpoint file, ready for inference."""
from __future__ import annotations

from typing import Union

import torch

from megatron_rwkvx.checkpointing.official_format import (
    OFFICIAL_RWKV7,
    REFERENCE_RWKVX,
    config_kwargs_from_state_dict,
    import_state_dict,
    load_state_dict_file,
)
from megatron_rwkvx.config import RWKVXConfig, default_pattern


def _prepare_runtime(device: torch.device) -> None:
    from megatron_rwkvx.parallel.state import ensure_single_process_parallel_state

    if device.type == "cpu" and not torch.cuda.is_available():
        from megatron_rwkvx import cpu_runtime

        cpu_runtime.enable()
    ensure_single_process_parallel_state()


def config_from_file_state_dict(sd, **overrides) -> tuple:
    """(config, layout) describing the model stored in an official-layout state dict."""
    if any(k.startswith("moba.") for k in sd):
        layout = REFERENCE_RWKVX
        kwargs = config_kwargs_from_state_dict(sd, layout)
        num_sparse = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("moba."))
        pattern = default_pattern(kwargs.pop("_num_rwkv"), num_sparse)
    else:
        layout = OFFICIAL_RWKV7
        kwargs = config_kwargs_from_state_dict(sd, layout)
        pattern = "R" * kwargs.pop("_num_rwkv")
    kwargs["layer_pattern"] = pattern
    kwargs.update(overrides)
    return kwargs, layout


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
    ``config_overrides`` set other config fields (e.g. ``sparse_chunk_size``, ``wkv_backend``;
    ``layer_pattern`` for an RWKV-X file whose sparse blocks are not interleaved as the reference).
    """
    device = torch.device(device)
    _prepare_runtime(device)
    sd = load_state_dict_file(path)
    kwargs, layout = config_from_file_state_dict(sd, **config_overrides)
    from megatron_rwkvx.models.rwkvx_model import RWKVXModel

    cfg = RWKVXConfig(params_dtype=dtype, use_cpu_initialization=True, **kwargs)
    model = RWKVXModel(cfg, parallel_output=False)
    import_state_dict(model, sd, cfg, layout, path=path)
    model.to(device=device)
    model.eval()
    return model
