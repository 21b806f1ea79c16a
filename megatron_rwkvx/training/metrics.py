"""Throughput, FLOPs/MFU estimates, memory, and the log line / TensorBoard scalars."""
from __future__ import annotations

import os
import time
from typing import Dict, Optional

import torch

from megatron_rwkvx.config import ATTENTION_SYMBOL, DENSE_MODE, RWKV_SYMBOL, RWKVXConfig


def model_flops_per_token(cfg: RWKVXConfig, seq_length: int) -> float:
    """Forward FLOPs per token (multiply-add = 2 FLOPs), excluding the embedding lookup.

    Matrix products: every projection once; RWKV-7 recurrence: about 8 N^2 per head per token
    (state decay + rank-one update + readout) in its chunked form; sparse attention: scores and
    values against the keys a query attends, min(position, top_k x chunk) on average over the
    sequence (with ``attention_mode="dense"``: the causal ramp over the whole sequence, T/2).
    """
    c, f, n = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_size
    h = cfg.num_attention_heads
    lora = 2 * c * (cfg.decay_lora_dim + cfg.a_lora_dim + cfg.v_lora_dim + cfg.gate_lora_dim)
    kv = (cfg.num_query_groups or h) * n
    channel_mix = 2 * (2 * c * f)
    rwkv_block = 2 * 4 * c * c + lora + 8 * n * n * h + channel_mix
    window = seq_length if cfg.attention_mode == DENSE_MODE else min(seq_length, cfg.sparse_top_k * cfg.sparse_chunk_size)
    # Average attended keys: the causal ramp up to the window, then the full window.
    attended = window / 2 if seq_length <= window else window - window * window / (2 * seq_length)
    attn_block = 2 * (2 * c * c + 2 * c * kv) + 2 * 2 * c * attended + channel_mix
    head = 2 * c * cfg.vocab_size
    return (
        cfg.layer_pattern.count(RWKV_SYMBOL) * rwkv_block
        + cfg.layer_pattern.count(ATTENTION_SYMBOL) * attn_block
        + head
    )


def memory_summary(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return f"mem {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    try:
        import psutil

        return f"rss {psutil.Process(os.getpid()).memory_info().rss / 2**30:.2f} GiB"
    except Exception:
        return "mem -"


class Logger:
    """The progress line, TensorBoard scalars and Weights & Biases, written by one rank.

    ``wandb_run`` takes the keywords of ``wandb.init`` (project, name, dir, entity, config);
    W&B's own settings apply, so ``WANDB_MODE=offline`` writes the run only to its directory.
    """

    def __init__(self, enabled: bool, tensorboard_dir: Optional[str], wandb_run: Optional[dict] = None):
        self.enabled = enabled
        self.writer = None
        self.wandb = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(tensorboard_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        if enabled and wandb_run:
            import wandb  # optional: --wandb-project is refused up front when it is missing

            os.makedirs(wandb_run["dir"], exist_ok=True)
            self.wandb = wandb.init(**wandb_run)
        self.start = time.time()

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if v is not None}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def wandb_run_options(args) -> Optional[dict]:
    """``wandb.init`` keywords for --wandb-project (Megatron-LM's flags), or None."""
    if not args.wandb_project:
        return None
    save_dir = args.wandb_save_dir or os.path.join(args.save or ".", "wandb")
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    return {"project": args.wandb_project, "name": args.wandb_exp_name, "dir": save_dir,
            "entity": args.wandb_entity, "config": config}


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"
