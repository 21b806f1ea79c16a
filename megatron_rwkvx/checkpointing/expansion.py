"""Block expansion: insert sparse-attention blocks into a pretrained RWKV-7 (RWKV-X stage 0).

Two initialisations of the new blocks (docs/design.md section 2):
* ``zero`` (default, the paper's): the attention output projection and the ChannelMix value
  projection are zero, so each new block is the identity and the expanded model reproduces the
  base model's outputs exactly;
* ``copy`` (the reference code's): the norms, R/K/V/O projections and the ChannelMix of the RWKV
  block just before are copied into the new block.
The result is a state dict in the RWKV-X reference layout (``rwkv.`` + RWKV-7 keys, ``moba.{i}.``).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from megatron_rwkvx.checkpointing.official_format import (
    OFFICIAL_RWKV7,
    CheckpointFormatError,
    config_kwargs_from_state_dict,
)
from megatron_rwkvx.config import (
    ATTENTION_SYMBOL,
    RWKV_SYMBOL,
    SPARSE_QK_INIT_SCALE,
    SPARSE_SHIFT_INIT,
    SPARSE_SHIFT_MIXES,
    SPARSE_VALUE_INIT_SCALE,
    ConfigError,
    default_pattern,
)
from megatron_rwkvx.layers import rwkv7_init

INIT_MODES = ("zero", "copy")


def resolve_pattern(num_rwkv: int, pattern: Optional[str], num_sparse_blocks: Optional[int]) -> str:
    if pattern and num_sparse_blocks is not None:
        raise ConfigError("give either --pattern or --num-sparse-blocks, not both")
    if pattern:
        pattern = pattern.strip().upper()
        bad = sorted({c for c in pattern if c not in (RWKV_SYMBOL, ATTENTION_SYMBOL)})
        if bad:
            raise ConfigError(f"pattern {pattern!r} has unknown symbol(s) {bad}; use R and A")
        if pattern.count(RWKV_SYMBOL) != num_rwkv:
            raise ConfigError(
                f"pattern {pattern!r} has {pattern.count(RWKV_SYMBOL)} R blocks but the base model "
                f"has {num_rwkv} RWKV blocks: the pattern must keep every base block"
            )
        return pattern
    if num_sparse_blocks is None:
        raise ConfigError("give --pattern or a positive --num-sparse-blocks")
    n = num_sparse_blocks
    divisors = ", ".join(str(d) for d in range(1, num_rwkv + 1) if num_rwkv % d == 0)
    if n < 1:
        raise ConfigError(f"--num-sparse-blocks must be at least 1, got {n}; the {num_rwkv} RWKV "
                          f"blocks of the base model take one of {divisors}")
    if num_rwkv % n:
        example = f" (e.g. --pattern {_spread(num_rwkv, n)})" if n <= num_rwkv else ""
        raise ConfigError(
            f"--num-sparse-blocks {n} cannot be spread evenly over the {num_rwkv} RWKV blocks of "
            f"the base model ({num_rwkv} is not a multiple of {n}): use one of {divisors}, or place the sparse blocks yourself with "
            f"--pattern, one R per RWKV block{example}"
        )
    return default_pattern(num_rwkv, n)


def _spread(num_rwkv: int, num_sparse: int) -> str:
    """A pattern with ``num_sparse`` sparse blocks spread as evenly as the counts allow."""
    after = {-(-(i + 1) * num_rwkv // num_sparse) for i in range(num_sparse)}
    return "".join(RWKV_SYMBOL + ATTENTION_SYMBOL * (j in after) for j in range(1, num_rwkv + 1))


def expand_rwkv7_state_dict(
    base: Dict[str, torch.Tensor],
    pattern: Optional[str] = None,
    num_sparse_blocks: Optional[int] = None,
    init: str = "zero",
    seed: int = 0,
    token_shift: bool = False,
) -> Tuple[Dict[str, torch.Tensor], str]:
    """Return (RWKV-X reference-layout state dict, pattern).

    ``token_shift``: the new blocks get token-shift mixes for their query/key/value inputs
    (``sparse_token_shift``, not in the reference): copied from the RWKV block before with
    ``init="copy"``, else every channel at ``SPARSE_SHIFT_INIT``."""
    if init not in INIT_MODES:
        raise ConfigError(f"init must be one of {INIT_MODES}, got {init!r}")
    if any(k.startswith(("moba.", "rwkv.")) for k in base):
        raise CheckpointFormatError(
            "the input already is an RWKV-X file (it has rwkv./moba. keys); expand an RWKV-7 file"
        )
    shape = config_kwargs_from_state_dict(base, OFFICIAL_RWKV7)
    num_rwkv = shape["_num_rwkv"]
    c = shape["hidden_size"]
    pattern = resolve_pattern(num_rwkv, pattern, num_sparse_blocks)
    dtype = base["emb.weight"].dtype
    gen = torch.Generator().manual_seed(seed)

    out = {f"rwkv.{k}": v for k, v in base.items()}
    sparse_index = 0
    for layer, symbol in enumerate(pattern):
        if symbol != ATTENTION_SYMBOL:
            continue
        before = pattern[:layer].count(RWKV_SYMBOL) - 1
        prefix = f"moba.{sparse_index}."
        if init == "copy":
            if before < 0:
                raise ConfigError(
                    f"sparse block {sparse_index} comes before any RWKV block: --init copy needs an "
                    "RWKV block before every sparse block; use --init zero or another pattern"
                )
            src = f"blocks.{before}."
            for name in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"):
                out[prefix + name] = base[src + name].clone()
            for proj in ("receptance", "key", "value", "output"):
                out[prefix + f"att.{proj}.weight"] = base[src + f"att.{proj}.weight"].clone()
            for name in ("x_k", "key.weight", "value.weight"):
                out[prefix + f"ffn.{name}"] = base[src + f"ffn.{name}"].clone()
            if token_shift:
                for name in SPARSE_SHIFT_MIXES:
                    out[prefix + f"att.{name}"] = base[src + f"att.{name}"].clone()
        else:
            f = shape["ffn_hidden_size"]

            def uniform(rows, cols, scale):
                weight = torch.empty(rows, cols)
                rwkv7_init.uniform_init(scale, generator=gen)(weight)
                return weight

            out[prefix + "ln1.weight"] = torch.ones(c)
            out[prefix + "ln1.bias"] = torch.zeros(c)
            out[prefix + "ln2.weight"] = torch.ones(c)
            out[prefix + "ln2.bias"] = torch.zeros(c)
            for proj in ("receptance", "key"):
                out[prefix + f"att.{proj}.weight"] = uniform(c, c, SPARSE_QK_INIT_SCALE)
            out[prefix + "att.value.weight"] = uniform(c, c, SPARSE_VALUE_INIT_SCALE)
            out[prefix + "att.output.weight"] = torch.zeros(c, c)
            x_k = rwkv7_init.channel_mix_vector(c, max(before, 0), num_rwkv)
            out[prefix + "ffn.x_k"] = x_k.reshape(1, 1, c)
            out[prefix + "ffn.key.weight"] = uniform(f, c, 0.5)
            out[prefix + "ffn.value.weight"] = torch.zeros(c, f)
            if token_shift:
                for name in SPARSE_SHIFT_MIXES:
                    out[prefix + f"att.{name}"] = torch.full((1, 1, c), SPARSE_SHIFT_INIT)
        for name in list(out):
            if name.startswith(prefix):
                out[name] = out[name].to(dtype).contiguous()
        sparse_index += 1
    return out, pattern
