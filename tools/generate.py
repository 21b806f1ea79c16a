#!/usr/bin/env python
"""Generate text from a trained checkpoint directory or a .pth, streaming tokens as they come.

  python tools/generate.py --model rwkvx.pth --prompt "The capital of France is" \
      --max-new-tokens 64 --temperature 1.0 --top-p 0.85 --seed 0

Temperature 0 is greedy. Long prompts prefill in pieces (``--piece-size``) with the same result as
one forward; ``--max-cached-chunks`` bounds the attention caches for unbounded streams.
"""
from __future__ import annotations

import argparse
import sys


class TextStream:
    """Prints the decoded text of a growing token list, holding back an incomplete UTF-8 tail."""

    def __init__(self, tokenizer, out=sys.stdout) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.tokens, self.printed = [], 0

    def push(self, token: int) -> None:
        if token == 0:
            return
        self.tokens.append(token)
        text = self.tokenizer.detokenize(self.tokens)
        end = len(text)
        while end > self.printed and "\udc80" <= text[end - 1] <= "\udcff":  # undecoded bytes so far
            end -= 1
        if end > self.printed:
            self.out.write(text[self.printed : end])
            self.out.flush()
            self.printed = end

    def finish(self) -> None:
        text = self.tokenizer.detokenize(self.tokens)
        tail = text[self.printed :].encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
        self.out.write(tail + "\n")
        self.out.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from megatron_rwkvx.evaluation.cli import add_model_args, engine_from_args, tokenizer_from_args

    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--piece-size", type=int, default=4096, help="prefill tokens per call")
    args = p.parse_args(argv)

    from megatron_rwkvx.inference.generation import generate
    from megatron_rwkvx.inference.sampling import SamplingParams

    try:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    except ValueError as e:
        p.error(str(e))
    prompt = args.prompt
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    tokenizer = tokenizer_from_args(args)
    engine = engine_from_args(args)
    ids = tokenizer.tokenize(prompt)
    if not ids:
        ids = [0]  # an empty prompt starts after an end-of-document token
    stream = TextStream(tokenizer)
    sys.stdout.write(prompt)
    generate(engine, [ids], args.max_new_tokens, sampling, seed=args.seed,
             on_token=lambda row, tok: stream.push(tok), prefill_piece=args.piece_size)
    stream.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
