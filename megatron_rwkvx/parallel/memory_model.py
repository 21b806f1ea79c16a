"""Per-GPU memory estimate of an RWKV-X training layout (documented in docs/parallelism.md).

Deliberately simple and explicit: every term is a formula a user can check by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List

from megatron_rwkvx.config import RWKVXConfig

# Activation elements kept for backward, per token, per block, in units of the width C
# (bf16 unless noted). RWKV-7 block: LN1 in, six token-shift mixes, r/k/v/w/a/g/kk projections,
# the recurrence output, group norm, gated output (~19 C), ChannelMix LN2 in, mix, 4C hidden before
# and after relu^2 (~10 C), plus fp32 decays (2 C in bf16 units). Sparse block: LN1 in, q/k/v,
# attention output and log-sum-exp (~6 C) plus the same ChannelMix (~10 C).
RWKV_BLOCK_ACT = 31
SPARSE_BLOCK_ACT = 16
BYTES_BF16 = 2


def parameter_count(cfg: RWKVXConfig) -> dict:
    c, f, n = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_size
    h = cfg.num_attention_heads
    kv = (cfg.num_query_groups or h) * n
    lora = 2 * c * (cfg.decay_lora_dim + cfg.a_lora_dim + cfg.v_lora_dim + cfg.gate_lora_dim)
    channel_mix = 2 * c * f + c
    rwkv = 4 * c * c + lora + 12 * c + 4 * c + channel_mix
    sparse = 2 * c * c + 2 * c * kv + 4 * c + channel_mix
    embedding = cfg.vocab_size * c
    return {
        "rwkv_block": rwkv,
        "sparse_block": sparse,
        "embedding": embedding,
        "head": embedding,
        "total": cfg.num_rwkv_layers * rwkv + cfg.num_sparse_layers * sparse + 2 * embedding + 6 * c,
    }


@dataclass
class Layout:
    tp: int
    pp: int
    cp: int
    dp: int
    distributed_optimizer: bool
    params_gib: float = 0.0
    optimizer_gib: float = 0.0
    activations_gib: float = 0.0
    logits_gib: float = 0.0

    @property
    def total_gib(self) -> float:
        return self.params_gib + self.optimizer_gib + self.activations_gib + self.logits_gib


def estimate(cfg: RWKVXConfig, seq_length: int, micro_batch: int, tp: int, pp: int, cp: int,
             dp: int, distributed_optimizer: bool = True, sequence_parallel: bool = True) -> Layout:
    counts = parameter_count(cfg)
    # The first stage also holds the embedding, the last the head: count the larger stage.
    per_stage_blocks = (counts["total"] - 2 * counts["embedding"]) / pp
    stage_params = per_stage_blocks + (counts["embedding"] if pp > 1 else 2 * counts["embedding"])
    local_params = stage_params / tp
    # bf16 weights + fp32 gradients; Adam: fp32 master + two moments (12 bytes), sharded over the
    # data-parallel x context-parallel group by the distributed optimizer.
    params_bytes = local_params * (2 + 4)
    optim_bytes = local_params * 12 / ((dp * cp) if distributed_optimizer else 1)
    tokens = seq_length / cp * micro_batch
    width = cfg.hidden_size
    per_token = (cfg.num_rwkv_layers * RWKV_BLOCK_ACT + cfg.num_sparse_layers * SPARSE_BLOCK_ACT) * width
    # 1F1B keeps up to `pp` micro-batches in flight on the first stage, each holding 1/pp of the
    # layers: the product is the whole model's activations for one micro-batch.
    act_bytes = tokens * per_token * BYTES_BF16 / (tp if sequence_parallel else 1)
    # fp32 logits and their gradient on the last stage, vocabulary split over TP.
    logits_bytes = tokens * cfg.vocab_size / tp * 4 * 2
    gib = 2**30
    return Layout(tp, pp, cp, dp, distributed_optimizer, params_bytes / gib, optim_bytes / gib,
                  act_bytes / gib, logits_bytes / gib)


def _powers_of_two(limit: int) -> Iterable[int]:
    v = 1
    while v <= limit:
        yield v
        v *= 2


def suggest_layouts(cfg: RWKVXConfig, seq_length: int, gpus: int, gpu_memory_gib: float,
                    micro_batch: int = 1, headroom: float = 0.85, max_tp: int = 8) -> List[Layout]:
    """Layouts that fit, best first: least model parallelism (tp x pp x cp), then smallest memory."""
    heads = cfg.num_attention_heads
    fits: List[Layout] = []
    for tp in _powers_of_two(min(max_tp, gpus)):
        if heads % tp:
            continue
        for cp in _powers_of_two(gpus // tp):
            local = seq_length // cp
            if seq_length % cp or (cfg.num_sparse_layers and cp > 1 and local % cfg.sparse_chunk_size):
                continue
            for pp in range(1, gpus // (tp * cp) + 1):
                if gpus % (tp * cp * pp) or cfg.num_layers % pp:
                    continue
                dp = gpus // (tp * cp * pp)
                layout = estimate(cfg, seq_length, micro_batch, tp, pp, cp, dp)
                if layout.total_gib <= headroom * gpu_memory_gib:
                    fits.append(layout)
    fits.sort(key=lambda l: (l.tp * l.pp * l.cp, l.pp, l.total_gib))
    return fits
