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
    """Prints the text of generated tokens as they come, after a prompt already printed.

    Each step decodes the new tokens together with a few tokens before them (at first the prompt's
    last ones) and prints what they add to the text. Decoding the new tokens alone loses text:
    SentencePiece (and Hugging Face Metaspace tokenizers) drop the word-boundary space (U+2581) of
    the first piece of a sequence, so "is" + " Paris" came out as "isParis". Text that ends in an
    incomplete UTF-8 character (undecoded bytes: U+DC80..U+DCFF escapes, or U+FFFD) is held back
    until the character is complete. The tokenizer's end-of-document id prints nothing.
    """

    CONTEXT = 8  # tokens of left context kept for decoding; enough for any word boundary

    def __init__(self, tokenizer, prompt_ids=(), out=None) -> None:
        self.tokenizer, self.out = tokenizer, out if out is not None else sys.stdout
        self.eod = tokenizer.eod
        self.tokens = [t for t in prompt_ids if t != self.eod][-self.CONTEXT:]
        self.printed = len(self.tokenizer.detokenize(self.tokens)) if self.tokens else 0

    def _complete_end(self, text: str) -> int:
        end = len(text)
        while end > self.printed and ("\udc80" <= text[end - 1] <= "\udcff" or text[end - 1] == "\ufffd"):
            end -= 1
        return end

    def push(self, token: int) -> None:
        if token == self.eod:
            return
        self.tokens.append(token)
        text = self.tokenizer.detokenize(self.tokens)
        end = self._complete_end(text)
        if end > self.printed:
            self.out.write(text[self.printed : end])
            self.out.flush()
            self.printed = end
        if end == len(text) and len(self.tokens) > 2 * self.CONTEXT:
            # Everything is printed: restart from the last tokens, so a step costs the same at the
            # ten-thousandth token as at the first.
            self.tokens = self.tokens[-self.CONTEXT:]
            self.printed = len(self.tokenizer.detokenize(self.tokens))

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
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except OSError as e:
            p.error(f"--prompt-file {args.prompt_file}: {e.strerror or e}")
    from megatron_rwkvx.errors import INPUT_ERRORS

    try:
        tokenizer = tokenizer_from_args(args)
        engine = engine_from_args(args)
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if tokenizer.vocab_size > engine.vocab_size:
        # The model would refuse the prompt's ids (or some of them) with a bare ValueError.
        print(f"error: the tokenizer ({args.tokenizer_type}, {tokenizer.vocab_size} ids) does not match "
              f"the model {args.model}, whose vocabulary has {engine.vocab_size} rows: the model was "
              "trained with another tokenizer; pass that one with --tokenizer-type and "
              "--tokenizer-model", file=sys.stderr)
        return 2
    ids = tokenizer.tokenize(prompt)
    if not ids:
        ids = [tokenizer.eod]  # an empty prompt starts after an end of document
    stream = TextStream(tokenizer, ids)
    sys.stdout.write(prompt)
    generate(engine, [ids], args.max_new_tokens, sampling, stop_tokens=(tokenizer.eod,), seed=args.seed,
             on_token=lambda row, tok: stream.push(tok), prefill_piece=args.piece_size)
    stream.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
