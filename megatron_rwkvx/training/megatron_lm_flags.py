"""Megatron-LM flags that describe a Transformer, answered in one line each.

A Megatron-LM user brings launch scripts written for GPT/Llama/Mamba models. Flags that set
something RWKV-X does not have (attention heads, position embeddings, the MLP's activation) must
not be silently dropped, nor end in argparse's usage dump: the user gets the flag's name, why it
does not apply, and the flag to use instead where there is one. A flag whose value states what
RWKV-X always does (``--disable-bias-linear``, dropout 0) is accepted, since refusing it would only
make scripts longer.
"""
from __future__ import annotations

import difflib
from typing import Dict, Iterable, List, Optional

_NO_POSITIONS = ("RWKV-X has no position embeddings: position comes from the RWKV-7 blocks' "
                 "recurrence and the sparse-attention blocks take no positional encoding; the "
                 "context length is --seq-length")
_HEADS = "the head count is --hidden-size / --head-size (RWKV-7 and sparse attention share it)"
_NO_MOE = "RWKV-X has no mixture-of-experts layers"

# flag -> why it does not apply (and what to use instead)
NOT_APPLICABLE: Dict[str, str] = {
    "--num-attention-heads": _HEADS + "; give --head-size",
    "--kv-channels": "the per-head width is --head-size",
    "--group-query-attention": "give --num-query-groups alone to share key/value heads in the "
                               "sparse-attention blocks",
    "--max-position-embeddings": _NO_POSITIONS,
    "--position-embedding-type": _NO_POSITIONS,
    "--no-position-embedding": _NO_POSITIONS,
    "--use-rotary-position-embeddings": _NO_POSITIONS,
    "--rotary-base": _NO_POSITIONS,
    "--rotary-percent": _NO_POSITIONS,
    "--rotary-interleaved": _NO_POSITIONS,
    "--rotary-seq-len-interpolation-factor": _NO_POSITIONS,
    "--use-rope-scaling": _NO_POSITIONS,
    "--rope-scaling-factor": _NO_POSITIONS,
    "--normalization": "RWKV-X's norms are fixed by the architecture (LayerNorm around each block, "
                       "GroupNorm inside the RWKV-7 time mix), as the reference checkpoints need",
    "--norm-epsilon": "the norms' epsilons are fixed by the architecture (1e-5 LayerNorm, 64e-5 "
                      "GroupNorm), as the reference checkpoints need",
    "--apply-layernorm-1p": "RWKV-X's LayerNorms are standard (weight, not 1 + weight)",
    "--swiglu": "RWKV-X's channel mix is fixed (token shift, squared ReLU); its width is "
                "--ffn-hidden-size",
    "--squared-relu": "RWKV-X's channel mix always uses squared ReLU: drop the flag",
    "--openai-gelu": "RWKV-X's channel mix uses squared ReLU, no GELU",
    "--untie-embeddings-and-output-weights": "RWKV-X's output head is always separate from the "
                                             "embedding: drop the flag",
    "--add-qkv-bias": "RWKV-X's projections are bias-free, as the reference checkpoints",
    "--add-bias-linear": "RWKV-X's projections are bias-free, as the reference checkpoints",
    "--qk-layernorm": "the sparse-attention blocks have no query/key norm in RWKV-X",
    "--multi-latent-attention": "RWKV-X's attention is top-k chunk sparse attention",
    "--use-flash-attn": "choose the sparse-attention kernel with --sparse-attention-backend",
    "--attention-backend": "choose the sparse-attention kernel with --sparse-attention-backend",
    "--transformer-impl": "RWKV-X's layers use Transformer Engine where it is importable and "
                          "megatron-core's local modules otherwise; there is no choice to make",
    "--hybrid-override-pattern": "give the stack as --layer-pattern (R = RWKV-7 block, A = "
                                 "sparse-attention block)",
    "--num-experts": _NO_MOE,
    "--moe-router-topk": _NO_MOE,
    "--moe-grouped-gemm": _NO_MOE,
    "--expert-model-parallel-size": _NO_MOE,
    "--encoder-num-layers": "RWKV-X is decoder-only: give --layer-pattern or --num-layers",
    "--decoder-num-layers": "give --layer-pattern or --num-layers",
    "--apply-residual-connection-post-layernorm": "RWKV-X blocks are pre-norm by construction",
    "--attention-softmax-in-fp32": "the sparse-attention kernels always take the softmax in fp32",
    "--init-method-std": "every RWKV-X weight has the reference's own initialisation (RWKV-7's "
                         "per-parameter scheme; new sparse blocks start with a zero output so the "
                         "expanded model equals its base): there is no single std to set",
}

# flags that would apply but that megatron-rwkvx does not implement: said so, not ignored
NOT_IMPLEMENTED: Dict[str, str] = {
    "--rampup-batch-size": "batch-size ramp-up is not implemented: give a constant --global-batch-size",
    "--decrease-batch-size-if-needed": "batch-size ramp-up is not implemented",
    "--data-args-path": "give the blend as --data-path ('w1 prefix1 w2 prefix2 ...')",
    "--per-split-data-args-path": "per-split blends are not implemented: give --data-path and --split",
    "--train-data-path": "per-split data paths are not implemented: give --data-path and --split",
    "--valid-data-path": "per-split data paths are not implemented: give --data-path and --split",
    "--test-data-path": "per-split data paths are not implemented: give --data-path and --split",
    "--tp-comm-overlap": "Transformer Engine's userbuffer overlap is not wired into RWKV-X's layers",
    "--use-torch-fsdp2": "FSDP is not supported: use --use-distributed-optimizer (ZeRO-1 sharding)",
    "--use-megatron-fsdp": "FSDP is not supported: use --use-distributed-optimizer (ZeRO-1 sharding)",
    "--fp8-format": "fp8 training is not implemented: use --bf16",
}

# flag -> the only value that describes RWKV-X (accepted; any other value is refused)
ALWAYS: Dict[str, float] = {
    "--attention-dropout": 0.0,
    "--hidden-dropout": 0.0,
}
# flags without a value that describe what RWKV-X always does (accepted)
ALWAYS_ON = ("--disable-bias-linear", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
             "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
             "--use-mcore-models", "--no-create-attention-mask-in-dataloader",
             "--ckpt-fully-parallel-save",
             "--exit-signal-handler",  # SIGTERM / SIGUSR1 always save and exit
             "--log-throughput")  # tokens/s, TFLOP/s/device and MFU are always on the log line


def add_accepted_flags(parser) -> None:
    """The flags of ``ALWAYS`` and ``ALWAYS_ON``, in their own help group."""
    g = parser.add_argument_group("Megatron-LM flags that state what RWKV-X always does (accepted)")
    for flag, value in ALWAYS.items():
        g.add_argument(flag, type=float, default=value, help=f"only {value} applies to RWKV-X")
    for flag in ALWAYS_ON:
        g.add_argument(flag, action="store_true", help="RWKV-X always behaves so")


def check_accepted_values(args) -> Optional[str]:
    """The message for an ``ALWAYS`` flag given another value, else None."""
    for flag, value in ALWAYS.items():
        given = getattr(args, flag.lstrip("-").replace("-", "_"))
        if given != value:
            return (f"{flag} {given}: RWKV-X trains without dropout (the reference recipe), so "
                    f"only {value} applies; drop the flag")
    return None


def explain_unknown(unknown: Iterable[str], known_flags: List[str]) -> Optional[str]:
    """One line for the first unrecognised command-line word, or None if there is none.

    Values of refused flags are skipped: ``--num-attention-heads 32`` is one problem, not two.
    """
    for word in unknown:
        if not word.startswith("--"):
            continue
        flag = word.split("=", 1)[0]
        if flag in NOT_APPLICABLE:
            return f"{flag} does not apply to RWKV-X: {NOT_APPLICABLE[flag]}"
        if flag in NOT_IMPLEMENTED:
            return f"{flag} is not supported by megatron-rwkvx: {NOT_IMPLEMENTED[flag]}"
        if flag.startswith("--moe-"):
            return f"{flag} does not apply to RWKV-X: {_NO_MOE}"
        close = difflib.get_close_matches(flag, known_flags, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else "; see --help for the flags"
        return f"unrecognized argument {flag}{hint}"
    words = list(unknown)
    return f"unrecognized arguments: {' '.join(words)}" if words else None
