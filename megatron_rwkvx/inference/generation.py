"""Text generation on top of the engine: prompts in, sampled tokens out (streamed per step)."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from megatron_rwkvx.inference.engine import InferenceEngine
from megatron_rwkvx.inference.sampling import SamplingParams, sample_next


@torch.no_grad()
def generate(
    engine: InferenceEngine,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(temperature=0.0),
    stop_tokens: Sequence[int] = (0,),
    seed: Optional[int] = None,
    on_token: Optional[Callable[[int, int], None]] = None,
    prefill_piece: Optional[int] = None,
) -> List[List[int]]:
    """New tokens for each prompt (rows of different lengths decode together).

    A row stops at ``max_new_tokens`` or after emitting a token of ``stop_tokens`` (kept in its
    output). The default, id 0, is the end of document of the RWKV World tokenizer only; with
    another tokenizer pass ``(tokenizer.eod,)`` (SentencePiece's id 0 is ``<unk>``, its end of
    document usually 2). ``on_token(row, token)`` is called as each token is chosen (streaming).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=engine.device).manual_seed(seed)
    state = engine.new_state(len(prompts))
    logits = engine.prefill(state, prompts, piece_size=prefill_piece)
    outputs: List[List[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    stops = set(int(t) for t in stop_tokens)
    while active and max_new_tokens > 0:
        chosen = sample_next(logits, sampling, generator).tolist()
        still = []
        for row, token in zip(active, chosen):
            outputs[row].append(token)
            if on_token is not None:
                on_token(row, token)
            if token not in stops and len(outputs[row]) < max_new_tokens:
                still.append(row)
        if not still:
            break
        logits = engine.decode(state, [outputs[r][-1] for r in still], rows=still)
        active = still
    return outputs
