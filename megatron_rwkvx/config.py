"""One configuration object for an RWKV-X model, extending megatron-core's ``TransformerConfig``.

Every invalid combination is refused in ``__post_init__`` with a message naming the field and the
fix, before megatron-core's own (terser) checks run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer import TransformerConfig

from megatron_rwkvx.errors import UsageError
from megatron_rwkvx.kernels.sparse_attention.selection import MEAN_SELECTION, SELECTION_RULES

RWKV_SYMBOL = "R"
ATTENTION_SYMBOL = "A"
PATTERN_SYMBOLS = {
    RWKV_SYMBOL: "RWKV-7 block (TimeMix + ChannelMix)",
    ATTENTION_SYMBOL: "top-k chunk sparse-attention block (attention + ChannelMix)",
}


# What an ``A`` block computes: the top-k chunk attention of RWKV-X, or dense causal attention
# (SDPA; the flash kernel on a GPU in half precision) with the same parameters: the baseline a
# sparse model of the same size is timed against.
SPARSE_MODE = "sparse"
DENSE_MODE = "dense"
ATTENTION_MODES = (SPARSE_MODE, DENSE_MODE)


def attention_layout_error(mode: str, context_parallel_size: int, mode_name: str = "attention_mode",
                           cp_name: str = "context_parallel_size") -> Optional[str]:
    """Why ``mode`` cannot run with ``context_parallel_size`` (None if it can), in the caller's names
    for the two settings (config fields or command-line flags)."""
    if mode == DENSE_MODE and context_parallel_size > 1:
        return (f"{mode_name} {mode} (the dense-attention baseline) attends over whole sequences; with "
                f"{cp_name} {context_parallel_size} each rank holds a shard and no dense path attends "
                f"across shards: use {cp_name} 1 for the baseline, or {mode_name} {SPARSE_MODE}")
    return None


# The token-shift mixes of a sparse block with ``sparse_token_shift``, in the model and in files:
# named as the RWKV blocks' (the query is the receptance).
SPARSE_SHIFT_MIXES = ("x_r", "x_k", "x_v")
# Their initial value in every channel: half the previous token, half the current one, as in the
# copy-toy runs where the sparse blocks learned to look up by content (docs/retrieval_study.md).
SPARSE_SHIFT_INIT = 0.5
# The sparse blocks' query and key weights start U(+-scale/sqrt(C)). On the LayerNorm's unit-variance
# input their scaled scores then have a standard deviation of scale**2 / 3 at any width: 0.33 at 1.0,
# as a transformer's usual init gives (nn.Linear's default; megatron's N(0, 0.02) at C=768 gives
# 0.31). At 0.5 (RWKV-7's receptance scale, this package's value until finding 16 of
# docs/retrieval_study.md) they are 4x flatter: the copy toy's attention learned its MQAR lookup in
# 2 of 12 dense runs, and at 1.0 in both seeds that had missed.
SPARSE_QK_INIT_SCALE = 1.0
# Their value weights keep RWKV-7's value scale.
SPARSE_VALUE_INIT_SCALE = 0.5


class ConfigError(UsageError):
    """A configuration that cannot describe a valid model or parallel layout."""


def official_lora_dim(kind: str, hidden_size: int) -> int:
    """LoRA widths of the official RWKV-7 code, rounded to multiples of 32."""
    c = float(hidden_size)
    if kind in ("decay", "a"):
        raw = 1.8 * math.sqrt(c)
    elif kind == "v":
        raw = 1.3 * math.sqrt(c)
    elif kind == "gate":
        raw = 0.6 * c**0.8
    else:
        raise ValueError(f"unknown LoRA kind {kind!r}")
    return max(32, int(round(raw / 32)) * 32)


def default_pattern(num_rwkv: int, num_sparse: int) -> str:
    """The reference interleaving: one sparse block after every ``num_rwkv / num_sparse`` RWKV
    blocks, ending on a sparse block."""
    if num_sparse == 0:
        return RWKV_SYMBOL * num_rwkv
    if num_rwkv % num_sparse != 0:
        raise ConfigError(
            f"cannot interleave {num_sparse} sparse blocks evenly among {num_rwkv} RWKV blocks: "
            f"num_rwkv ({num_rwkv}) must be a multiple of the number of sparse blocks; "
            "give an explicit pattern instead"
        )
    group = num_rwkv // num_sparse
    return (RWKV_SYMBOL * group + ATTENTION_SYMBOL) * num_sparse


@dataclass
class RWKVXConfig(TransformerConfig):
    """Configuration of an RWKV-X (or plain RWKV-7) model.

    ``layer_pattern`` decides the stack: ``R`` an RWKV-7 block, ``A`` a sparse-attention block. When
    empty it defaults to ``num_layers`` RWKV blocks; when given, ``num_layers`` is derived from it.
    ``num_attention_heads`` is derived from ``hidden_size / head_size`` when left at 0.
    """

    # RWKV has no dropout; megatron's defaults (0.1) would silently change the model.
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    head_size: int = 64
    vocab_size: int = 65536
    layer_pattern: str = ""

    # LoRA widths of the RWKV-7 TimeMix; None means the official formula.
    decay_lora_dim: Optional[int] = None
    a_lora_dim: Optional[int] = None
    v_lora_dim: Optional[int] = None
    gate_lora_dim: Optional[int] = None

    # Sparse attention (MoBA semantics).
    sparse_chunk_size: int = 2048
    sparse_top_k: int = 3
    attention_mode: str = SPARSE_MODE
    # Token shift on the sparse blocks' query/key/value inputs (x + mu * (x[t-1] - x), mu learned per
    # channel, as RWKV's own blocks mix their inputs). Not in the reference RWKV-X, which is False:
    # without it a key can only name the token before it through what the RWKV-7 blocks write into
    # the residual stream, and at small scale the sparse blocks never learned to look up by content
    # (docs/retrieval_study.md, finding 13).
    sparse_token_shift: bool = False
    # How a query scores the past chunks it may select: "mean" (the chunk's mean key, the reference
    # RWKV-X's and MoBA's rule) or "quest" (the largest score one of its keys can reach, Quest's bound;
    # kernels/sparse_attention/selection.py). A training choice, like the chunk size: a stage may
    # change it. docs/retrieval_study.md, findings 21-22: the mean key missed the chunk of an asked
    # value for 11-48% of the questions where the bound missed none, and training at 2048 with the
    # mean key live lost a lookup that the bound kept.
    sparse_selection: str = MEAN_SELECTION

    # Operator backends: "auto" picks Triton on CUDA and PyTorch on the CPU.
    wkv_backend: str = "auto"
    sparse_attention_backend: str = "auto"

    # Group-norm epsilon of the RWKV-7 output norm (official: 64e-5).
    rwkv_ln_x_eps: float = 64e-5

    # RWKV's L2Wrap logit regulariser (0 = off; the reference uses 1e-4 per token).
    l2wrap_factor: float = 0.0

    def __post_init__(self) -> None:
        self._validate_and_derive()
        super().__post_init__()

    # The checks live in one method so that subclasses and tools can re-run them cheaply.
    def _validate_and_derive(self) -> None:
        if self.hidden_size <= 0:
            raise ConfigError(f"hidden_size must be positive, got {self.hidden_size}")
        if self.head_size <= 0:
            raise ConfigError(f"head_size must be positive, got {self.head_size}")
        if self.hidden_size % self.head_size != 0:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not a multiple of head_size "
                f"({self.head_size}): choose hidden_size = head_size x number of heads"
            )
        heads = self.hidden_size // self.head_size
        if self.num_attention_heads in (0, None):
            self.num_attention_heads = heads
        elif self.num_attention_heads != heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must equal hidden_size / "
                f"head_size = {heads}; leave it at 0 to derive it"
            )
        if self.kv_channels is None:
            self.kv_channels = self.head_size
        elif self.kv_channels != self.head_size:
            raise ConfigError(
                f"kv_channels ({self.kv_channels}) must equal head_size ({self.head_size})"
            )

        pattern = (self.layer_pattern or "").strip().upper()
        if not pattern:
            if self.num_layers <= 0:
                raise ConfigError("give either layer_pattern (e.g. 'RRRA') or num_layers > 0")
            pattern = RWKV_SYMBOL * self.num_layers
        unknown = sorted({c for c in pattern if c not in PATTERN_SYMBOLS})
        if unknown:
            known = ", ".join(f"{k} = {v}" for k, v in PATTERN_SYMBOLS.items())
            raise ConfigError(
                f"layer_pattern {self.layer_pattern!r} has unknown symbol(s) {unknown}; "
                f"use only {known}"
            )
        if self.num_layers not in (0, None) and self.layer_pattern and self.num_layers != len(pattern):
            raise ConfigError(
                f"num_layers ({self.num_layers}) disagrees with layer_pattern of length "
                f"{len(pattern)}; leave num_layers at 0 to derive it from the pattern"
            )
        self.layer_pattern = pattern
        self.num_layers = len(pattern)

        tp = self.tensor_model_parallel_size
        if heads % tp != 0:
            raise ConfigError(
                f"the {heads} heads (hidden_size {self.hidden_size} / head_size {self.head_size}) "
                f"are not divisible by tensor_model_parallel_size ({tp}): choose a "
                f"tensor-parallel size that divides {heads}"
            )
        if self.num_query_groups is not None:
            if self.num_query_groups <= 0 or heads % self.num_query_groups != 0:
                raise ConfigError(
                    f"num_query_groups ({self.num_query_groups}) must divide the number of "
                    f"heads ({heads}) for grouped-query attention"
                )
            if self.num_query_groups % tp != 0:
                raise ConfigError(
                    f"num_query_groups ({self.num_query_groups}) must be divisible by "
                    f"tensor_model_parallel_size ({tp}) so every rank owns whole key/value heads"
                )

        if self.vocab_size <= 0:
            raise ConfigError(f"vocab_size must be positive, got {self.vocab_size}")
        if self.sparse_chunk_size <= 0:
            raise ConfigError(f"sparse_chunk_size must be positive, got {self.sparse_chunk_size}")
        if self.sparse_top_k < 1:
            raise ConfigError(
                f"sparse_top_k must be >= 1 (the own chunk counts as one), got {self.sparse_top_k}"
            )
        if self.attention_mode not in ATTENTION_MODES:
            raise ConfigError(
                f"attention_mode {self.attention_mode!r} is unknown; choose one of {list(ATTENTION_MODES)}"
            )
        if self.sparse_selection not in SELECTION_RULES:
            raise ConfigError(
                f"sparse_selection {self.sparse_selection!r} is unknown; choose one of {list(SELECTION_RULES)}"
            )
        layout_error = attention_layout_error(self.attention_mode, self.context_parallel_size)
        if layout_error:
            raise ConfigError(layout_error)

        for field, kind in (
            ("decay_lora_dim", "decay"),
            ("a_lora_dim", "a"),
            ("v_lora_dim", "v"),
            ("gate_lora_dim", "gate"),
        ):
            value = getattr(self, field)
            if value is None:
                setattr(self, field, official_lora_dim(kind, self.hidden_size))
            elif value <= 0:
                raise ConfigError(f"{field} must be positive, got {value}")

        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.ffn_hidden_size % tp != 0:
            raise ConfigError(
                f"ffn_hidden_size ({self.ffn_hidden_size}) is not divisible by "
                f"tensor_model_parallel_size ({tp})"
            )
        if self.vocab_size % tp != 0:
            raise ConfigError(
                f"vocab_size ({self.vocab_size}) is not divisible by tensor_model_parallel_size "
                f"({tp}): pad the vocabulary (65536 is divisible by every power of two)"
            )

    @property
    def num_rwkv_layers(self) -> int:
        return self.layer_pattern.count(RWKV_SYMBOL)

    @property
    def num_sparse_layers(self) -> int:
        return self.layer_pattern.count(ATTENTION_SYMBOL)

    def rwkv_index(self, layer_index: int) -> int:
        """Index of layer ``layer_index`` (0-based, global) among the RWKV blocks."""
        if self.layer_pattern[layer_index] != RWKV_SYMBOL:
            raise ValueError(f"layer {layer_index} is not an RWKV block")
        return self.layer_pattern[:layer_index].count(RWKV_SYMBOL)

    def sparse_index(self, layer_index: int) -> int:
        """Index of layer ``layer_index`` (0-based, global) among the sparse-attention blocks."""
        if self.layer_pattern[layer_index] != ATTENTION_SYMBOL:
            raise ValueError(f"layer {layer_index} is not a sparse-attention block")
        return self.layer_pattern[:layer_index].count(ATTENTION_SYMBOL)
