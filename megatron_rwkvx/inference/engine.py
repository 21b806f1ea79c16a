"""Incremental inference for a single-process ``RWKVXModel``: prefill in pieces, decode per token.

``InferenceEngine.forward(state, tokens [R, L], rows)`` runs ``L`` new tokens of the batch rows
``rows`` through every layer, carrying each layer's state (see ``state.py``), and returns their
logits. Any split of a sequence into calls gives the logits of one full forward (exactly, up to
fp32 rounding): the RWKV blocks resume from their shift tokens and WKV state, and the attention
blocks reproduce the training chunk selection (``attention_cache.py``).

Batches: rows have their own lengths. Prefill runs row by row (each row its own prompt length);
a decode step (``L == 1``) runs the RWKV blocks, projections and chunk selection batched over rows
at different positions, and the attention itself per row and head on views of the cache.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from megatron_rwkvx.inference.state import InferenceState, RWKVLayerState, check_decodable, new_state


class InferenceEngine:
    def __init__(self, model, max_cached_chunks: Optional[int] = None,
                 step_wkv_backend: Optional[str] = "naive") -> None:
        cfg = model.config
        if cfg.tensor_model_parallel_size != 1 or cfg.pipeline_model_parallel_size != 1:
            raise ValueError(
                "inference runs a single-process model; load it with megatron_rwkvx.load_pretrained "
                "or inference.load_model (tensor/pipeline parallel size 1)"
            )
        if getattr(cfg, "context_parallel_size", 1) != 1:
            raise ValueError("inference does not run under context parallelism; use context_parallel_size=1")
        if not (model.pre_process and model.post_process):
            raise ValueError("the model must own the embedding and the head (a single pipeline stage)")
        check_decodable(cfg)  # before a tool reads its inputs, not at its first sequence
        self.model = model
        self.max_cached_chunks = max_cached_chunks
        # One-token steps: the chunked WKV kernel pays ~10 ms of per-call setup on the CPU for a
        # single token; the per-token recurrence ('naive', the same math) costs ~0.1 ms. Only an
        # 'auto' choice on the CPU is replaced: an explicit backend or a GPU keeps its kernel.
        self.step_wkv_backend = step_wkv_backend
        self.vocab_size = cfg.vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_state(self, batch_size: int = 1) -> InferenceState:
        return new_state(self.model, batch_size, self.max_cached_chunks, self.device)

    @torch.no_grad()
    def forward(self, state: InferenceState, tokens, rows: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Logits ``[R, L, V]`` of ``tokens`` ``[R, L]`` appended to the rows ``rows`` (default all)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [rows, length], got shape {tuple(tokens.shape)}")
        rows = list(range(state.batch_size)) if rows is None else [int(r) for r in rows]
        if len(rows) != tokens.shape[0]:
            raise ValueError(f"{tokens.shape[0]} token rows given for {len(rows)} state rows {rows}")
        if len(set(rows)) != len(rows) or any(r < 0 or r >= state.batch_size for r in rows):
            raise ValueError(f"rows must be distinct indices in [0, {state.batch_size}), got {rows}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got {int(tokens.min())}..{int(tokens.max())}")
        if tokens.shape[1] == 0:
            return torch.empty(len(rows), 0, self.vocab_size, device=self.device)

        whole = rows == list(range(state.batch_size))
        index = torch.tensor(rows, device=self.device)

        def pick(t):
            return t if whole else t[index]

        def put(t, value):
            if whole:
                t.copy_(value)
            else:
                t[index] = value.to(t.dtype)

        model = self.model
        step_backend = None
        if (tokens.shape[1] == 1 and self.step_wkv_backend and model.config.wkv_backend == "auto"
                and self.device.type == "cpu"):
            step_backend = self.step_wkv_backend
        saved_backend = model.config.wkv_backend
        if step_backend is not None:
            model.config.wkv_backend = step_backend
        try:
            logits = self._layers(state, tokens, rows, pick, put)
        finally:
            model.config.wkv_backend = saved_backend
        for r in rows:
            state.lengths[r] += tokens.shape[1]
        return logits

    def _layers(self, state: InferenceState, tokens: torch.Tensor, rows: List[int], pick, put) -> torch.Tensor:
        model = self.model
        hidden = model.ln0(model.embedding(input_ids=tokens, position_ids=None))  # [L, R, C]
        v_first = None
        for layer, st in zip(model.decoder.layers, state.layers):
            x = layer.input_norm(hidden)
            if isinstance(st, RWKVLayerState):
                step = layer.mixer.forward_with_state(
                    x, v_first, previous_token=pick(st.time_shift), initial_state=pick(st.wkv)
                )
                (mixed, _), v_first = step.output, step.v_first
                put(st.time_shift, step.last_token)
                put(st.wkv, step.wkv_state)
            else:
                mixed = self._attention(layer.mixer, st.cache, x, rows, pick(st.time_shift))
                put(st.time_shift, x[-1])
            hidden = hidden + mixed
            x = layer.pre_mlp_norm(hidden)
            out, _ = layer.mlp(x, previous_token=pick(st.channel_shift))
            put(st.channel_shift, x[-1])
            hidden = hidden + out
        logits, _ = model.output_layer(model.decoder.final_norm(hidden))
        return logits.transpose(0, 1).float()

    def _attention(self, mixer, cache, x: torch.Tensor, rows: List[int], previous_token) -> torch.Tensor:
        length, r_count, _ = x.shape
        d = mixer.head_size
        q, k, v = mixer.project(x, previous_token)
        scale = d**-0.5
        if length == 1:
            out = cache.attend_decode(rows, q[0], k[0], v[0], scale)[None]
        else:
            backend = mixer.config.sparse_attention_backend
            out = torch.stack([
                cache.attend_prefill(row, q[:, i], k[:, i], v[:, i], scale, backend)
                for i, row in enumerate(rows)
            ], dim=1)
        return mixer.output(out.reshape(length, r_count, -1))[0]

    @torch.no_grad()
    def prefill(self, state: InferenceState, prompts: Sequence[Sequence[int]],
                piece_size: Optional[int] = None, return_all: bool = False):
        """Feed one prompt per row (lengths may differ), ``piece_size`` tokens per call.

        Returns the logits of each row's last prompt token ``[B, V]``, or with ``return_all`` a
        list of ``[len_b, V]`` tensors (every position: what a full forward would give).
        """
        if len(prompts) != state.batch_size:
            raise ValueError(f"{len(prompts)} prompts for a state of {state.batch_size} rows")
        if piece_size is not None and piece_size < 1:
            raise ValueError(f"piece_size must be >= 1, got {piece_size}")
        last, every = [], []
        for row, prompt in enumerate(prompts):
            prompt = list(prompt)
            if not prompt:
                raise ValueError(f"prompt {row} is empty; give at least one token (e.g. end-of-document 0)")
            step = piece_size or len(prompt)
            pieces = [
                self.forward(state, [prompt[i : i + step]], rows=[row])[0]
                for i in range(0, len(prompt), step)
            ]
            last.append(pieces[-1][-1])
            if return_all:
                every.append(torch.cat(pieces, dim=0))
        return every if return_all else torch.stack(last)

    def decode(self, state: InferenceState, tokens, rows: Optional[Sequence[int]] = None) -> torch.Tensor:
        """One token per row: ``tokens`` [R] -> logits [R, V]."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        return self.forward(state, tokens, rows)[:, 0]
