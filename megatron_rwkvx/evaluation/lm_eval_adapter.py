"""lm-evaluation-harness model ``rwkvx``: loglikelihood, rolling loglikelihood and generation.

Registered with lm-eval's model registry when ``lm_eval`` is importable, so after
``import megatron_rwkvx.evaluation.lm_eval_adapter`` (or through
``python -m megatron_rwkvx.evaluation.lm_eval_cli``, which imports it and runs lm-eval's CLI)::

    python -m megatron_rwkvx.evaluation.lm_eval_cli --model rwkvx \
        --model_args pretrained=rwkvx.pth --tasks lambada_openai,piqa

Requests are lm-eval ``Instance`` objects; only their ``args`` are read: ``(context,
continuation)`` for the loglikelihoods, ``(string,)`` for the rolling one and ``(context,
gen_kwargs)`` for generation. Every sequence runs through the exact incremental engine in pieces,
so there is no context window to slide: a rolling loglikelihood is one pass over the document.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import torch

from megatron_rwkvx.evaluation.cli import parse_number
from megatron_rwkvx.inference.engine import InferenceEngine
from megatron_rwkvx.inference.sampling import SamplingParams, sample_next

try:  # lm-eval is optional: the adapter works (and is tested) without it
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register_model
except ImportError:  # pragma: no cover - depends on the environment
    _LMBase, _register_model = object, None

_log = logging.getLogger(__name__)


def _resolve_device(device: Optional[str]) -> str:
    """lm-eval passes ``cuda:0`` unless told otherwise; like its own Hugging Face model, fall back
    to the CPU (with a warning) when no GPU is present rather than failing after the load."""
    device = device or "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        _log.warning("rwkvx: device %r asked for but CUDA is not available; running on the CPU", device)
        return "cpu"
    return device


def _parse_arg_string(arg_string: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in (arg_string or "").split(","))):
        if "=" not in item:
            raise ValueError(f"model_args entries must be key=value, got {item!r}")
        key, value = item.split("=", 1)
        value = parse_number(value)
        if isinstance(value, str):
            value = {"true": True, "false": False, "none": None}.get(value.lower(), value)
        out[key] = value
    return out


class RWKVXLM(_LMBase):

    def __init__(self, pretrained: Optional[str] = None, device: str = "cpu", dtype: str = "float32",
                 tokenizer_type: str = "RWKVWorldTokenizer", tokenizer_model: Optional[str] = None,
                 max_cached_chunks: Optional[int] = None, max_gen_toks: int = 256,
                 piece_size: int = 4096, engine: Optional[InferenceEngine] = None, tokenizer=None,
                 batch_size=1, max_batch_size=None, **config_overrides) -> None:
        if _LMBase is not object:
            super().__init__()
        if batch_size not in (1, "1", None, "auto") or max_batch_size not in (None, 1):
            # Every request runs alone through the exact engine; a batch would only change speed.
            _log.warning("rwkvx: batch_size=%s ignored; requests are scored one at a time", batch_size)
        self._device = torch.device(_resolve_device(device)) if engine is None else next(
            engine.model.parameters()).device
        if engine is None:
            if pretrained is None:
                raise ValueError("give pretrained=<.pth file or checkpoint directory> in --model_args")
            from megatron_rwkvx.inference.loading import load_model

            model = load_model(pretrained, device=self._device, dtype=getattr(torch, dtype), **config_overrides)
            engine = InferenceEngine(model, max_cached_chunks=max_cached_chunks)
        if tokenizer is None:
            from megatron_rwkvx.data.tokenizers import build_tokenizer

            tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
        self.engine, self.tokenizer = engine, tokenizer
        # End-of-document: the prefix of an empty context (lm-eval's prefix token) and the stop
        # token; the tokenizer's own (0 for RWKV World, 2 for a typical SentencePiece model).
        self.EOD = tokenizer.eod
        self.max_gen_toks = int(max_gen_toks)
        self.piece_size = int(piece_size)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        kwargs = _parse_arg_string(arg_string)
        kwargs.update({k: v for k, v in (additional_config or {}).items() if v is not None})
        return cls(**kwargs)

    # ---------------------------------------------------------------------------------- helpers
    def _encode(self, text: str) -> List[int]:
        return list(self.tokenizer.tokenize(text))

    def _encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        # Trailing spaces of the context belong to the continuation's first token (lm-eval's rule).
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        if not context:
            return [self.EOD], self._encode(continuation)
        whole = self._encode(context + continuation)
        context_ids = self._encode(context)
        return context_ids, whole[len(context_ids):]

    @torch.no_grad()
    def _score(self, ids: Sequence[int], scored: int) -> Tuple[float, bool]:
        """(sum of log-probs of the last ``scored`` tokens of ``ids``, all of them greedy)."""
        if scored < 1 or scored >= len(ids):
            raise ValueError(f"cannot score {scored} of {len(ids)} tokens (the first token has no context)")
        state = self.engine.new_state(1)
        first = len(ids) - 1 - scored  # logits index predicting the first scored token
        target = torch.as_tensor(ids, dtype=torch.long)
        total, greedy = 0.0, True
        for start in range(0, len(ids) - 1, self.piece_size):
            stop = min(start + self.piece_size, len(ids) - 1)
            logits = self.engine.forward(state, [list(ids[start:stop])])[0].float().cpu()
            lo = max(first, start)
            if lo >= stop:
                continue
            part = logits[lo - start :]
            want = target[lo + 1 : stop + 1]
            logp = torch.log_softmax(part, dim=-1)
            total += float(logp.gather(-1, want[:, None]).sum())
            greedy = greedy and bool((part.argmax(dim=-1) == want).all())
        return total, greedy

    def _cache(self, kind: str, args, result) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            hook.add_partial(kind, args, result)

    # ---------------------------------------------------------------------------------- lm-eval API
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self._encode_pair(context, continuation)
            if not cont:
                raise ValueError(f"continuation {continuation!r} encodes to no tokens; nothing to score")
            result = self._score(ctx + cont, len(cont))
            self._cache("loglikelihood", req.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        out = []
        for req in requests:
            (text,) = req.args
            ids = self._encode(text)
            if not ids:
                out.append(0.0)
                continue
            result = self._score([self.EOD] + ids, len(ids))[0]
            self._cache("loglikelihood_rolling", req.args, result)
            out.append(result)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
            params = SamplingParams(temperature=temperature if do_sample else 0.0,
                                    top_p=float(kwargs.pop("top_p", 1.0)))
            ids = self._encode(context) or [self.EOD]
            state = self.engine.new_state(1)
            logits = self.engine.prefill(state, [ids], piece_size=self.piece_size)
            tokens: List[int] = []
            text = ""
            for _ in range(max_new):
                token = int(sample_next(logits, params)[0])
                if token == self.EOD:
                    break
                tokens.append(token)
                text = self.tokenizer.detokenize(tokens)
                if any(stop in text for stop in until):
                    break
                logits = self.engine.decode(state, [token])
            for stop in until:
                text = text.split(stop)[0]
            self._cache("generate_until", req.args, text)
            out.append(text)
        return out


if _register_model is not None:  # pragma: no cover - needs lm_eval installed
    _register_model("rwkvx")(RWKVXLM)
