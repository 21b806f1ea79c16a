"""Load a model for inference from a ``.pth`` file or a training checkpoint directory."""
from __future__ import annotations

import os
from typing import Union

import torch

from megatron_rwkvx.checkpointing.megatron_format import TRAINING_CHOICES, load_model_checkpoint, read_model_config
from megatron_rwkvx.config import ConfigError, RWKVXConfig
from megatron_rwkvx.models.rwkvx_model import RWKVXModel
from megatron_rwkvx.pretrained import load_pretrained, prepare_runtime


def load_model(path: str, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
               **config_overrides):
    """A single-process ``RWKVXModel`` in eval mode.

    ``path``: a ``.pth`` (official RWKV-7 or RWKV-X reference layout, see ``load_pretrained``) or a
    directory written by training (``model_config.json`` + megatron dist-checkpoint iterations;
    any tensor/pipeline layout). ``config_overrides`` change non-architecture fields such as
    ``sparse_attention_backend`` or ``wkv_backend``, and the training choices a later stage may
    change too (``TRAINING_CHOICES``: e.g. ``sparse_selection=quest`` reads a model trained with
    the mean key through Quest's bound).
    """
    if os.path.isdir(path):
        device = torch.device(device)
        prepare_runtime(device)
        arch = read_model_config(path)
        clash = sorted(k for k in config_overrides
                       if k in arch and k not in TRAINING_CHOICES and config_overrides[k] != arch[k])
        if clash:
            raise ConfigError(
                f"cannot override architecture field(s) {clash} of the checkpoint in {path}; "
                "they must match the saved model_config.json"
            )
        cfg = RWKVXConfig(params_dtype=dtype, use_cpu_initialization=True, **{**arch, **config_overrides})
        model = RWKVXModel(cfg, parallel_output=False)
        load_model_checkpoint(model, cfg, path)
        model.to(device=device)
        model.eval()
        return model
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is neither a .pth checkpoint file nor a checkpoint directory")
    return load_pretrained(path, device=device, dtype=dtype, **config_overrides)
