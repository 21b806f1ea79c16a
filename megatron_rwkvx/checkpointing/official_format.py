"""Import and export of single-file checkpoints in the official RWKV-7 (x070) key layout.

The official file is a flat state dict (``emb.weight``, ``blocks.{i}.att.*``, ``blocks.{i}.ffn.*``,
``ln_out.*``, ``head.weight``; docs/design.md section 1). The RWKV-X reference layout (``rwkv.`` +
those keys, ``moba.{i}.*`` for the sparse blocks) plugs into the same machinery through
``KeyLayout``. Files are read with ``torch.load(weights_only=True)``: a downloaded checkpoint must
not be able to run code.

Every model parameter has one ``Entry``: the model key, the file key, how the file tensor maps to
the full (unsharded) model tensor, and the tensor-parallel split dimension, so import slices and
export gathers with the same table.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from megatron.core import parallel_state

from megatron_rwkvx.config import ATTENTION_SYMBOL, RWKV_SYMBOL, SPARSE_SHIFT_MIXES, RWKVXConfig
from megatron_rwkvx.errors import UsageError


class CheckpointFormatError(UsageError):
    """A checkpoint file that does not fit the model (missing, unexpected or misshapen keys)."""


# How a file tensor becomes the full model tensor, and back.
def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _flatten(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t()


_TO_MODEL: Dict[str, Callable] = {"same": _identity, "vector": _flatten, "transpose": _transpose}


def to_file_layout(kind: str, t: torch.Tensor) -> torch.Tensor:
    """A model tensor as the official file stores it (``kind``: that of its ``Entry``)."""
    if kind == "same":
        return t
    if kind == "vector":
        return t.reshape(1, 1, -1)
    if kind == "transpose":
        return t.t()
    raise ValueError(kind)


@dataclass(frozen=True)
class Entry:
    model_key: str
    file_key: str
    kind: str  # "same" | "vector" ([1,1,C] in the file, [C] in the model) | "transpose"
    split_dim: Optional[int]  # tensor-parallel split of the model tensor, None if replicated
    full_shape: Tuple[int, ...]  # the model tensor's unsharded shape


@dataclass(frozen=True)
class KeyLayout:
    """Where the blocks of each kind live in a file."""

    rwkv_block_prefix: str = "blocks.{i}."  # i = index among RWKV blocks
    sparse_block_prefix: str = "moba.{i}."  # i = index among sparse blocks
    global_prefix: str = ""  # prefix of emb/ln_out/head (and of RWKV blocks in RWKV-X files)


OFFICIAL_RWKV7 = KeyLayout()
REFERENCE_RWKVX = KeyLayout(rwkv_block_prefix="rwkv.blocks.{i}.", global_prefix="rwkv.")


def _time_mix_entries(cfg: RWKVXConfig, model_prefix: str, file_prefix: str, first_rwkv: bool) -> List[Entry]:
    c, h, n = cfg.hidden_size, cfg.num_attention_heads, cfg.head_size
    out: List[Entry] = []
    mp, fp = model_prefix + "mixer.", file_prefix + "att."
    for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
        out.append(Entry(mp + name, fp + name, "vector", None, (c,)))
    split_vectors = ["w0", "a0", "k_k", "k_a"] + ([] if first_rwkv else ["v0"])
    for name in split_vectors:
        out.append(Entry(mp + name, fp + name, "vector", 0, (c,)))
    out.append(Entry(mp + "r_k", fp + "r_k", "same", 0, (h, n)))
    loras = [("w", cfg.decay_lora_dim), ("a", cfg.a_lora_dim), ("g", cfg.gate_lora_dim)]
    if not first_rwkv:
        loras.append(("v", cfg.v_lora_dim))
    for key, dim in loras:
        out.append(Entry(mp + f"{key}1", fp + f"{key}1", "same", None, (c, dim)))
        out.append(Entry(mp + f"{key}2.weight", fp + f"{key}2", "transpose", 0, (c, dim)))
    for name in ("receptance", "key", "value"):
        out.append(Entry(mp + f"{name}.weight", fp + f"{name}.weight", "same", 0, (c, c)))
    out.append(Entry(mp + "output.weight", fp + "output.weight", "same", 1, (c, c)))
    out.append(Entry(mp + "ln_x_weight", fp + "ln_x.weight", "same", 0, (c,)))
    out.append(Entry(mp + "ln_x_bias", fp + "ln_x.bias", "same", 0, (c,)))
    return out


def _channel_mix_entries(cfg: RWKVXConfig, model_prefix: str, file_prefix: str) -> List[Entry]:
    c, f = cfg.hidden_size, cfg.ffn_hidden_size
    mp, fp = model_prefix + "mlp.", file_prefix + "ffn."
    return [
        Entry(mp + "x_k", fp + "x_k", "vector", None, (c,)),
        Entry(mp + "key.weight", fp + "key.weight", "same", 0, (f, c)),
        Entry(mp + "value.weight", fp + "value.weight", "same", 1, (c, f)),
    ]


def _norm_entries(model_prefix: str, file_prefix: str, c: int) -> List[Entry]:
    return [
        Entry(model_prefix + "weight", file_prefix + "weight", "same", None, (c,)),
        Entry(model_prefix + "bias", file_prefix + "bias", "same", None, (c,)),
    ]


def _sparse_attention_entries(cfg: RWKVXConfig, model_prefix: str, file_prefix: str) -> List[Entry]:
    c = cfg.hidden_size
    kv = (cfg.num_query_groups or cfg.num_attention_heads) * cfg.head_size
    mp, fp = model_prefix + "mixer.", file_prefix + "att."
    entries = [
        Entry(mp + "query.weight", fp + "receptance.weight", "same", 0, (c, c)),
        Entry(mp + "key.weight", fp + "key.weight", "same", 0, (kv, c)),
        Entry(mp + "value.weight", fp + "value.weight", "same", 0, (kv, c)),
        Entry(mp + "output.weight", fp + "output.weight", "same", 1, (c, c)),
    ]
    if cfg.sparse_token_shift:  # [1,1,C] in the file, as the RWKV blocks' x_r/x_k/x_v
        entries += [Entry(mp + name, fp + name, "vector", None, (c,)) for name in SPARSE_SHIFT_MIXES]
    return entries


def has_sparse_token_shift(sd: Dict[str, torch.Tensor], layout: KeyLayout = REFERENCE_RWKVX) -> bool:
    """Whether an RWKV-X file's sparse blocks carry token-shift mixes (not in the reference)."""
    return layout.sparse_block_prefix.format(i=0) + "att.x_k" in sd


def checkpoint_entries(cfg: RWKVXConfig, layout: KeyLayout = OFFICIAL_RWKV7) -> List[Entry]:
    """The full table for a model described by ``cfg`` (all pipeline stages)."""
    c, g = cfg.hidden_size, layout.global_prefix
    entries = [
        Entry("embedding.word_embeddings.weight", g + "emb.weight", "same", 0, (cfg.vocab_size, c)),
    ]
    entries += _norm_entries("ln0.", layout.rwkv_block_prefix.format(i=0) + "ln0.", c)
    for i, symbol in enumerate(cfg.layer_pattern):
        mp = f"decoder.layers.{i}."
        if symbol == RWKV_SYMBOL:
            j = cfg.rwkv_index(i)
            fp = layout.rwkv_block_prefix.format(i=j)
            entries += _norm_entries(mp + "input_norm.", fp + "ln1.", c)
            entries += _norm_entries(mp + "pre_mlp_norm.", fp + "ln2.", c)
            entries += _time_mix_entries(cfg, mp, fp, first_rwkv=(j == 0))
        elif symbol == ATTENTION_SYMBOL:
            fp = layout.sparse_block_prefix.format(i=cfg.sparse_index(i))
            entries += _norm_entries(mp + "input_norm.", fp + "ln1.", c)
            entries += _norm_entries(mp + "pre_mlp_norm.", fp + "ln2.", c)
            entries += _sparse_attention_entries(cfg, mp, fp)
        else:  # config validation makes this unreachable
            raise CheckpointFormatError(f"unknown layer symbol {symbol!r}")
        entries += _channel_mix_entries(cfg, mp, fp)
    entries += _norm_entries("decoder.final_norm.", g + "ln_out.", c)
    entries.append(Entry("output_layer.weight", g + "head.weight", "same", 0, (cfg.vocab_size, c)))
    return entries


# Keys an official file may carry that the model does not use: the first block's value-residual
# parameters exist in some trainers' files but x070 ignores them.
def _ignorable(key: str, layout: KeyLayout) -> bool:
    first = re.escape(layout.rwkv_block_prefix.format(i=0))
    return re.fullmatch(first + r"att\.v[012]", key) is not None


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6; older files are bare pickles
_EXPECTED = ("expected a PyTorch state dict of tensors written by torch.save(model.state_dict(), path), "
             "such as an official RWKV-7 .pth")


def _unreadable_reason(exc: Exception, zipped: bool) -> str:
    """One line on why torch.load gave up, instead of its advice to file an issue."""
    m = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if m:
        return (f"it holds Python objects ({m.group(1)}) besides tensors, and loading those could "
                "run arbitrary code, so files like that are refused (weights-only loading)")
    if zipped and isinstance(exc, RuntimeError):
        return "it is a zip archive, but not a complete one written by torch.save (truncated or damaged?)"
    if isinstance(exc, EOFError):
        return "it ends in the middle of its data (truncated?)"
    return "its contents are not a torch.save serialisation"


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """Read a ``.pth`` safely (no code execution), memory-mapped where possible."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
    except OSError as exc:
        raise CheckpointFormatError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not head:
        raise CheckpointFormatError(f"{path} is empty, not a PyTorch checkpoint; {_EXPECTED}")
    zipped = head == _ZIP_MAGIC
    try:
        # Only the zip format can be memory-mapped.
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as exc:  # arbitrary bytes make the unpickler fail in arbitrary ways
        raise CheckpointFormatError(
            f"{path} is not a PyTorch checkpoint that can be read weights-only: "
            f"{_unreadable_reason(exc, zipped)}; {_EXPECTED}"
        ) from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointFormatError(
            f"{path} is not a flat state dict of tensors (found {type(sd).__name__}); export it "
            "with torch.save(model.state_dict(), path)"
        )
    return sd


def describe_architecture(sd: Dict[str, torch.Tensor]) -> str:
    keys = set(sd)
    if any(k.startswith("moba.") for k in keys):
        return "RWKV-X (reference layout)"
    if "blocks.0.att.r_k" in keys:
        return "RWKV-7 (x070)"
    if any(re.match(r"blocks\.\d+\.att\.time_(mix|decay|first|maa)", k) for k in keys):
        return "an older RWKV generation (RWKV-4/5/6: time_mix/time_decay keys)"
    if any(k.startswith(("model.layers.", "transformer.h.", "gpt_neox.")) for k in keys):
        return "a Hugging Face transformer (not an RWKV file)"
    if any(k.startswith(("decoder.layers.", "embedding.word_embeddings")) for k in keys):
        return "a megatron-style state dict (use the megatron checkpoint loader instead)"
    return "unknown"


def config_kwargs_from_state_dict(
    sd: Dict[str, torch.Tensor], layout: KeyLayout = OFFICIAL_RWKV7
) -> dict:
    """Model shape read off an official-layout file (RWKV-7, or RWKV-X with ``REFERENCE_RWKVX``)."""
    g = layout.global_prefix
    r_k = layout.rwkv_block_prefix.format(i=0) + "att.r_k"
    if r_k not in sd or g + "emb.weight" not in sd:
        raise CheckpointFormatError(
            f"not an RWKV-7 checkpoint in the expected layout: key {r_k!r} or {g + 'emb.weight'!r} "
            f"is missing; the file looks like {describe_architecture(sd)}"
        )
    vocab, hidden = sd[g + "emb.weight"].shape
    heads, head_size = sd[r_k].shape
    block_re = re.compile(re.escape(layout.rwkv_block_prefix).replace(r"\{i\}", r"(\d+)"))
    num_rwkv = 1 + max(int(m.group(1)) for k in sd if (m := block_re.match(k)))
    blk = layout.rwkv_block_prefix.format(i=min(1, num_rwkv - 1))
    blk0 = layout.rwkv_block_prefix.format(i=0)
    kwargs = dict(
        hidden_size=int(hidden),
        head_size=int(head_size),
        vocab_size=int(vocab),
        decay_lora_dim=int(sd[blk0 + "att.w1"].shape[1]),
        a_lora_dim=int(sd[blk0 + "att.a1"].shape[1]),
        gate_lora_dim=int(sd[blk0 + "att.g1"].shape[1]),
        ffn_hidden_size=int(sd[blk0 + "ffn.key.weight"].shape[0]),
    )
    if blk + "att.v1" in sd:
        kwargs["v_lora_dim"] = int(sd[blk + "att.v1"].shape[1])
    kwargs["_num_rwkv"] = num_rwkv
    return kwargs


def _check_keys(sd: Dict[str, torch.Tensor], entries: List[Entry], layout: KeyLayout, path: str):
    expected = {e.file_key for e in entries}
    missing = sorted(expected - set(sd))
    unexpected = sorted(k for k in set(sd) - expected if not _ignorable(k, layout))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:12])}" + (" ..." if len(missing) > 12 else ""))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}" + (" ..." if len(unexpected) > 12 else ""))
    for e in entries:
        if e.file_key in sd:
            got = tuple(_TO_MODEL[e.kind](sd[e.file_key]).shape)
            if got != e.full_shape:
                problems.append(
                    f"misshapen key {e.file_key}: file has {tuple(sd[e.file_key].shape)}, the model "
                    f"needs {tuple(to_file_layout(e.kind, torch.empty(e.full_shape)).shape)}"
                )
    if problems:
        raise CheckpointFormatError(
            f"{path} does not match the model (file looks like {describe_architecture(sd)}):\n  "
            + "\n  ".join(problems)
            + "\nCheck the model shape/pattern, or convert the file for this architecture."
        )


def _tp_slice(t: torch.Tensor, split_dim: Optional[int], rank: int, world: int) -> torch.Tensor:
    if split_dim is None or world == 1:
        return t
    size = t.shape[split_dim] // world
    return t.narrow(split_dim, rank * size, size)


def import_state_dict(
    model: torch.nn.Module,
    sd: Dict[str, torch.Tensor],
    cfg: RWKVXConfig,
    layout: KeyLayout = OFFICIAL_RWKV7,
    path: str = "<state dict>",
) -> None:
    """Copy an official-layout state dict into ``model`` (this rank's tensor/pipeline shard)."""
    entries = checkpoint_entries(cfg, layout)
    _check_keys(sd, entries, layout, path)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_world = parallel_state.get_tensor_model_parallel_world_size()
    local = model.state_dict(keep_vars=True)
    local_layers = _local_layer_map(model)
    filled = set()
    for e in entries:
        key = _localise(e.model_key, local_layers)
        if key is None or key not in local:
            continue  # lives on another pipeline stage
        full = _TO_MODEL[e.kind](sd[e.file_key])
        shard = _tp_slice(full, e.split_dim, tp_rank, tp_world)
        target = local[key]
        if tuple(target.shape) != tuple(shard.shape):
            raise CheckpointFormatError(
                f"key {e.file_key}: shard shape {tuple(shard.shape)} does not fit model parameter "
                f"{key} {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(shard.to(target.dtype))
        filled.add(key)
    left = sorted(k for k in local if k not in filled and not k.endswith("_extra_state"))
    if left:
        raise CheckpointFormatError(
            f"model parameters not covered by the checkpoint table: {', '.join(left[:10])}"
        )


def _local_layer_map(model: torch.nn.Module) -> Dict[int, int]:
    """Global layer index -> local index for the layers this pipeline stage holds."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        return {}
    return {decoder.layer_offset + i: i for i in range(len(decoder.layers))}


def _localise(model_key: str, local_layers: Dict[int, int]) -> Optional[str]:
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", model_key)
    if not m:
        return model_key
    g = int(m.group(1))
    if g not in local_layers:
        return None
    return f"decoder.layers.{local_layers[g]}.{m.group(2)}"


def export_state_dict(
    model: torch.nn.Module,
    cfg: RWKVXConfig,
    layout: KeyLayout = OFFICIAL_RWKV7,
    dtype: Optional[torch.dtype] = None,
    tensors: Optional[Dict[str, torch.Tensor]] = None,
    fill_unused: bool = True,
) -> Dict[str, torch.Tensor]:
    """Gather the model into one official-layout state dict (collective over TP and PP groups).

    Every rank returns the full dict. ``tensors`` replaces the model's own state dict (same local
    keys), e.g. to gather gradients into the file layout.
    """
    tp_world = parallel_state.get_tensor_model_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    local = model.state_dict() if tensors is None else tensors
    local_layers = _local_layer_map(model)
    mine: Dict[str, torch.Tensor] = {}
    for e in checkpoint_entries(cfg, layout):
        key = _localise(e.model_key, local_layers)
        if key is None or key not in local:
            continue
        t = local[key].detach()
        if e.split_dim is not None and tp_world > 1:
            parts = [torch.empty_like(t) for _ in range(tp_world)]
            torch.distributed.all_gather(parts, t.contiguous(), group=tp_group)
            t = torch.cat(parts, dim=e.split_dim)
        t = to_file_layout(e.kind, t).contiguous()
        mine[e.file_key] = t.to(dtype) if dtype is not None else t.clone()
    pp_world = parallel_state.get_pipeline_model_parallel_world_size()
    if pp_world > 1:
        gathered: List[Optional[dict]] = [None] * pp_world
        torch.distributed.all_gather_object(
            gathered, mine, group=parallel_state.get_pipeline_model_parallel_group()
        )
        mine = {}
        for part in gathered:
            mine.update(part)
    # Files written for the official trainer carry (unused) value-residual tensors in block 0.
    first = layout.rwkv_block_prefix.format(i=0)
    if fill_unused and RWKV_SYMBOL in cfg.layer_pattern and first + "att.v0" not in mine:
        like = mine[first + "att.x_v"]
        c = cfg.hidden_size
        mine[first + "att.v0"] = torch.zeros(1, 1, c, dtype=like.dtype)
        mine[first + "att.v1"] = torch.zeros(c, cfg.v_lora_dim, dtype=like.dtype)
        mine[first + "att.v2"] = torch.zeros(cfg.v_lora_dim, c, dtype=like.dtype)
    return mine
