"""Per-GPU memory estimate of an RWKV-X training layout (documented in docs/parallelism.md).

Deliberately simple and explicit: every term is a formula a user can check by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

from megatron_rwkvx.config import RWKVXConfig

# (granularity, method, num_layers) as Megatron-LM's --recompute-* flags give them.
Recompute = Tuple[Optional[str], Optional[str], Optional[int]]
NO_RECOMPUTE: Recompute = (None, None, None)

# Bytes one block keeps per token for its backward, measured by tools/bench_activation_memory.py
# (saved-tensor hooks, unique storages; bf16/fp16 activations; docs/benchmarks/activation_memory.md)
# for the GPU kernels ("triton", counted in Triton's interpreter) and the CPU backends ("torch"):
#   rep_C*C + lora*(sum of the four LoRA widths) + (split_C*C + ffn*F)/tp
#   + no_sp_C*C*(1 - 1/tp) without sequence parallelism.
# Context parallelism adds, without recomputation, cp_C*C/tp per local token to an RWKV block (the
# shard summary and rerun of the state hand-off) and cp_kv*Ckv/tp*(cp-1)/cp per token of the whole
# sequence to a sparse block (the last rank keeps the gathered K/V). Full recomputation keeps one
# unit's input; the figures are for units of one block (uniform, 1).
BLOCK_BYTES = {
    "triton": {
        "R/none": dict(rep_C=18.0, split_C=48.297, ffn=4.0, lora=2.0, no_sp_C=4.062, cp_C=28.0),
        "R/selective": dict(rep_C=0.0, split_C=8.0, ffn=2.0, lora=0.0, no_sp_C=2.0),
        "R/full": dict(rep_C=0.0, split_C=2.0, ffn=0.0, lora=0.0, no_sp_C=2.0),
        "A/none": dict(rep_C=6.0, split_C=12.385, ffn=4.0, lora=0.0, no_sp_C=4.062, cp_kv=4.0),
        "A/selective": dict(rep_C=0.0, split_C=8.0, ffn=2.0, lora=0.0, no_sp_C=2.0),
        "A/full": dict(rep_C=0.0, split_C=2.0, ffn=0.0, lora=0.0, no_sp_C=2.0),
    },
    "torch": {
        "R/none": dict(rep_C=18.0, split_C=66.504, ffn=4.0, lora=2.0, no_sp_C=4.031, cp_C=51.4),
        "R/selective": dict(rep_C=0.0, split_C=8.0, ffn=2.0, lora=0.0, no_sp_C=2.0),
        "R/full": dict(rep_C=0.0, split_C=2.0, ffn=0.0, lora=0.0, no_sp_C=2.0),
        "A/none": dict(rep_C=6.0, split_C=16.406, ffn=4.0, lora=0.0, no_sp_C=4.031, cp_kv=4.0),
        "A/selective": dict(rep_C=0.0, split_C=8.0, ffn=2.0, lora=0.0, no_sp_C=2.0),
        "A/full": dict(rep_C=0.0, split_C=2.0, ffn=0.0, lora=0.0, no_sp_C=2.0),
    },
}
# Embedding, ln0, final norm, head and loss, per token: the loss keeps the fp32 softmax of the
# vocabulary shard (4 bytes per entry), the norms and the head their inputs (6 C), token ids and
# masks (25 bytes). Measured with the same counter (tests/test_memory_model.py).
HEAD_BYTES = dict(vocab=4.0, C=6.0, const=25.0)
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
             dp: int, distributed_optimizer: bool = True, sequence_parallel: bool = True,
             recompute: Recompute = NO_RECOMPUTE, backend: str = "triton") -> Layout:
    counts = parameter_count(cfg)
    # The first stage also holds the embedding, the last the head: count the larger stage.
    per_stage_blocks = (counts["total"] - 2 * counts["embedding"]) / pp
    stage_params = per_stage_blocks + (counts["embedding"] if pp > 1 else 2 * counts["embedding"])
    local_params = stage_params / tp
    # bf16 weights + fp32 gradients; Adam: fp32 master + two moments (12 bytes), sharded over the
    # data-parallel x context-parallel group by the distributed optimizer.
    params_bytes = local_params * (2 + 4)
    optim_bytes = local_params * 12 / ((dp * cp) if distributed_optimizer else 1)
    acts = activation_bytes(cfg, seq_length, micro_batch, tp, pp, cp, sequence_parallel,
                            recompute, backend)
    act_bytes = acts["total"] - acts["loss_softmax"]
    # fp32 logits (the loss's softmax) and their gradient on the last stage, vocabulary split over TP.
    logits_bytes = 2 * acts["loss_softmax"]
    gib = 2**30
    return Layout(tp, pp, cp, dp, distributed_optimizer, params_bytes / gib, optim_bytes / gib,
                  act_bytes / gib, logits_bytes / gib)


def block_bytes_per_token(cfg: RWKVXConfig, symbol: str, mode: str, tp: int = 1,
                          sequence_parallel: bool = True, backend: str = "triton") -> float:
    """Bytes one ``symbol`` block keeps per (local) token with recompute ``mode`` (none,
    selective, full), without the context-parallel terms."""
    k = BLOCK_BYTES[backend][f"{symbol}/{mode}"]
    c, f = cfg.hidden_size, cfg.ffn_hidden_size
    lora = cfg.decay_lora_dim + cfg.a_lora_dim + cfg.v_lora_dim + cfg.gate_lora_dim
    out = k["rep_C"] * c + k["lora"] * lora + (k["split_C"] * c + k["ffn"] * f) / tp
    if not sequence_parallel:
        out += k["no_sp_C"] * c * (1 - 1 / tp)
    return out


def _context_parallel_bytes(cfg: RWKVXConfig, symbol: str, mode: str, tokens: float, cp: int,
                            tp: int, backend: str) -> float:
    """What context parallelism adds to one block on the rank that keeps most (the last)."""
    k = BLOCK_BYTES[backend][f"{symbol}/{mode}"]
    if cp == 1:
        return 0.0
    kv = (cfg.num_query_groups or cfg.num_attention_heads) * cfg.head_size
    return (k.get("cp_C", 0.0) * cfg.hidden_size / tp * tokens
            + k.get("cp_kv", 0.0) * kv / tp * tokens * cp * (cp - 1) / cp)


def _stage_units(layers: str, recompute: Recompute):
    """(symbols, mode) of each unit of a stage: a block kept whole, a recomputed block, or a
    recomputed group (whose kept input counts once)."""
    from megatron_rwkvx.models.recompute import recompute_units

    granularity, method, n = recompute
    if granularity is None:
        return [(s, "none") for s in layers]
    if granularity == "selective":
        return [(s, "selective") for s in layers]
    units = []
    for start, end, recomputed in recompute_units(len(layers), method, n):
        if recomputed:
            units.append((layers[start:end], "full"))
        else:
            units += [(s, "none") for s in layers[start:end]]
    return units


def activation_bytes(cfg: RWKVXConfig, seq_length: int, micro_batch: int = 1, tp: int = 1,
                     pp: int = 1, cp: int = 1, sequence_parallel: bool = True,
                     recompute: Recompute = NO_RECOMPUTE, backend: str = "triton") -> dict:
    """Bytes kept for the backward on the rank that keeps most, by part: ``blocks``, ``v_first``,
    ``recompute_peak`` (what one unit rebuilds during its backward), the loss's ``loss_softmax``
    and the rest of the ``head`` (embedding, norms, head input), and their ``total``."""
    sp = sequence_parallel and tp > 1
    tokens = seq_length / cp * micro_batch
    # The first stage is the fullest: with 1F1B it keeps pp micro-batches of its 1/pp of the
    # layers in flight, the whole model's worth for one micro-batch. Stages split the pattern evenly.
    per_stage = cfg.num_layers // pp
    blocks = peak = 0.0
    for stage in range(pp):
        layers = cfg.layer_pattern[stage * per_stage : (stage + 1) * per_stage]
        for symbols, mode in _stage_units(layers, recompute):
            if mode == "full":
                # A group keeps its input once; its blocks are rebuilt one group at a time.
                blocks += tokens * block_bytes_per_token(cfg, symbols[0], "full", tp, sp, backend)
                rebuilt = sum(tokens * block_bytes_per_token(cfg, s, "none", tp, sp, backend)
                              + _context_parallel_bytes(cfg, s, "none", tokens, cp, tp, backend)
                              for s in symbols)
            else:
                kept = tokens * block_bytes_per_token(cfg, symbols, mode, tp, sp, backend)
                blocks += kept + _context_parallel_bytes(cfg, symbols, mode, tokens, cp, tp, backend)
                rebuilt = 0.0 if mode == "none" else (
                    tokens * block_bytes_per_token(cfg, symbols, "none", tp, sp, backend)
                    + _context_parallel_bytes(cfg, symbols, "none", tokens, cp, tp, backend) - kept)
            peak = max(peak, rebuilt)
    # v_first ([t, b, C / tp], one per stage and micro-batch in flight) travels with the stack.
    v_first = tokens * cfg.hidden_size / tp * BYTES_BF16 * pp if cfg.num_rwkv_layers else 0.0
    loss_softmax = tokens * cfg.vocab_size / tp * HEAD_BYTES["vocab"]
    head = tokens * (HEAD_BYTES["C"] * cfg.hidden_size / (tp if sp else 1) + HEAD_BYTES["const"])
    parts = dict(blocks=blocks, v_first=v_first, recompute_peak=peak, loss_softmax=loss_softmax,
                 head=head)
    parts["total"] = sum(parts.values())
    return parts


def _powers_of_two(limit: int) -> Iterable[int]:
    v = 1
    while v <= limit:
        yield v
        v *= 2


def suggest_layouts(cfg: RWKVXConfig, seq_length: int, gpus: int, gpu_memory_gib: float,
                    micro_batch: int = 1, headroom: float = 0.85, max_tp: int = 8,
                    recompute: Recompute = NO_RECOMPUTE) -> List[Layout]:
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
                if recompute[0] == "full" and recompute[2] > cfg.num_layers // pp:
                    continue
                layout = estimate(cfg, seq_length, micro_batch, tp, pp, cp, dp, recompute=recompute)
                if layout.total_gib <= headroom * gpu_memory_gib:
                    fits.append(layout)
    fits.sort(key=lambda l: (l.tp * l.pp * l.cp, l.pp, l.total_gib))
    return fits
