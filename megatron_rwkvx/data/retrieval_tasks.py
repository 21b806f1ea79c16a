"""Synthetic long-context retrieval documents: passkey (the reference format) and multi-query
associative recall (MQAR), for training corpora and for the evaluators.

MQAR document (``mqar_document``)::

    Remember these pairs: ab3 kq0 ... zt9.
    <filler: the passkey filler paragraph, repeated>
    Recall: kq0 ab3 ...

``num_pairs`` pairs of a two-letter key and a one-digit value come first (4 bytes a pair, so
many pairs fit a short context; chance accuracy is 10%), the filler fills the
document to its length, and ``num_queries`` of the keys are asked again at the end, each followed
by its value (the tokens scored). Keys are letters and values digits, so which is which needs no
separator. The parts are kept apart (``context``, ``queries``) so an evaluator can find the value
tokens with any tokenizer.

With ``key_letters=1`` the keys are single characters: letters, lowercase and uppercase (at most 52
pairs), or with ``alphabet="symbols"`` also punctuation and Latin-1 letters (at most 144):
the retrieval study's curriculum (docs/retrieval_study.md, findings 20-22), where the lookup is on
the token before the value alone. ``filler=False`` leaves the filler out (the curriculum's
no-filler layout), and ``mqar_compact_document`` is its first layout, the pairs and the questions
with no spaces, header or filler (``G6B5...X0.U2L7...``). Every MQAR document also gives
``answer_spans``: the ``[start, end)`` character spans of the asked values in its text, for
``tools/preprocess_data.py --loss-spans-key`` and ``pretrain --loss-on-spans``.

Copy document (``copy_document``, training only)::

    Copy: x7k2q. Again: x7k2q.
    Copy: 0fz9... Again: 0fz9...

random strings of letters and digits, each repeated once, as many as fit: half its tokens can be
predicted only by copying from earlier in the context. It stands in for the repetition that
natural-text pretraining is full of (names, numbers, code): a base trained on passkey and MQAR
documents alone never learns to copy (see docs/retrieval_study.md).

Seeds: evaluation uses seeds ``0, 1, ...``; training corpora use ``TRAIN_SEED_BASE + i``, so no
evaluation document is ever in the training data.
"""
from __future__ import annotations

import random
import string
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megatron_rwkvx.data.sample_corpus import PASSKEY_FILLER, PASSKEY_QUESTION, largest_fitting, passkey_document

TRAIN_SEED_BASE = 1_000_000
MQAR_HEADER = "Remember these pairs:"
MQAR_RECALL = "Recall:"
COPY_ALPHABET = string.ascii_lowercase + string.digits
ONE_LETTER_KEYS = string.ascii_lowercase + string.ascii_uppercase
# One character per key, more of them than the letters: the ASCII punctuation that no document's
# structure uses (the header's ':', the filler's '.' and '?', the separators ' ' and ','), then the
# Latin-1 letters U+00C0..U+00FF. Those are two UTF-8 bytes, 0xC3 and one of 0x80..0xBF, so with the
# byte tokenizer every key still ends in a token of its own, the token a lookup on the value's
# predecessor matches.
ONE_SYMBOL_KEYS = (ONE_LETTER_KEYS + "".join(c for c in string.punctuation if c not in ".:?,")
                   + "".join(chr(c) for c in range(0xC0, 0x100)))
KEY_ALPHABETS = {"letters": ONE_LETTER_KEYS, "symbols": ONE_SYMBOL_KEYS}
TASK_KINDS = ("passkey", "mqar", "copy")


def mqar_pairs(num_pairs: int, rng: random.Random, key_letters: int = 2,
               alphabet: str = "letters") -> List[Tuple[str, str]]:
    """``num_pairs`` distinct keys of ``key_letters`` characters (two: lowercase letters; one: from
    ``KEY_ALPHABETS[alphabet]``), each with a one-digit value."""
    if key_letters == 1:
        if alphabet not in KEY_ALPHABETS:
            raise ValueError(f"alphabet must be one of {sorted(KEY_ALPHABETS)}, got {alphabet!r}")
        keys = KEY_ALPHABETS[alphabet]
        if not 1 <= num_pairs <= len(keys):
            raise ValueError(f"num_pairs must be in 1..{len(keys)} (one-character keys from the {alphabet} "
                             f"alphabet), got {num_pairs}")
        return [(k, str(rng.randrange(10))) for k in rng.sample(keys, num_pairs)]
    if key_letters != 2:
        raise ValueError(f"key_letters must be 1 or 2, got {key_letters}")
    if alphabet != "letters":
        raise ValueError("two-letter keys are lowercase letters: alphabet must be 'letters'")
    if not 1 <= num_pairs <= 26 * 26:
        raise ValueError(f"num_pairs must be in 1..676 (two-letter keys), got {num_pairs}")
    letters = string.ascii_lowercase
    keys = rng.sample([a + b for a in letters for b in letters], num_pairs)
    return [(k, str(rng.randrange(10))) for k in keys]


def _answer_spans(text: str, queries: Sequence[Tuple[str, str]]) -> List[List[int]]:
    """The ``[start, end)`` spans of the values of ``queries``, which end ``text`` in order."""
    at = len(text) - sum(len(k) + len(v) for k, v in queries)
    spans = []
    for key, value in queries:
        at += len(key)
        spans.append([at, at + len(value)])
        at += len(value)
    return spans


def mqar_document(length_tokens: int, num_pairs: int, num_queries: int, seed: int,
                  count_tokens: Callable[[str], int], key_letters: int = 2, filler: bool = True,
                  alphabet: str = "letters") -> Dict:
    """An MQAR document of at most ``length_tokens`` tokens (filler as long as fits; none with
    ``filler=False``).

    Returns ``context`` (pairs, filler, ``Recall:``), ``queries`` (``[(" key", "value"), ...]``,
    the text that follows the context in order), ``text`` (all of it), ``answer_spans`` and the
    settings.
    """
    if not 1 <= num_queries <= num_pairs:
        raise ValueError(f"num_queries must be in 1..num_pairs ({num_pairs}), got {num_queries}")
    # Two-letter documents keep the seed string they always had: evaluation seeds mean the same
    # documents as in every earlier result.
    rng = random.Random(f"mqar/{seed}/{length_tokens}/{num_pairs}/{num_queries}"
                        + ("" if key_letters == 2 else f"/keys{key_letters}")
                        + ("" if alphabet == "letters" else f"/{alphabet}"))
    pairs = mqar_pairs(num_pairs, rng, key_letters, alphabet)
    asked = rng.sample(pairs, num_queries)
    head = MQAR_HEADER + " " + " ".join(k + v for k, v in pairs) + "."
    queries = [(" " + k, v) for k, v in asked]
    tail = "".join(k + v for k, v in queries)

    def build(reps: int) -> str:
        return " ".join([head] + [PASSKEY_FILLER] * reps + [MQAR_RECALL]) + tail

    too_short = lambda least: (  # noqa: E731
        f"an MQAR document with {num_pairs} pairs and {num_queries} queries needs at least {least} tokens; "
        f"{length_tokens} is too short (use a longer length or fewer pairs/queries)")
    if filler:
        reps = largest_fitting(build, length_tokens, count_tokens, too_short)
    else:
        reps = 0
        if count_tokens(build(0)) > length_tokens:
            raise ValueError(too_short(count_tokens(build(0))))
    context = " ".join([head] + [PASSKEY_FILLER] * reps + [MQAR_RECALL])
    text = context + tail
    return {"context": context, "queries": queries, "text": text, "pairs": [k + v for k, v in pairs],
            "answer_spans": _answer_spans(text, queries), "target_length": length_tokens, "num_pairs": num_pairs,
            "num_queries": num_queries, "seed": seed, "alphabet": alphabet}


def mqar_compact_document(num_pairs: int, seed: int, key_letters: int = 1) -> Dict:
    """The curriculum's first layout: the pairs and then every key asked again in another order,
    with no spaces, header or filler (``G6B5...X0.U2L7...``); ``text`` and ``answer_spans``."""
    rng = random.Random(f"mqar-compact/{seed}/{num_pairs}/{key_letters}")
    pairs = mqar_pairs(num_pairs, rng, key_letters)
    queries = rng.sample(pairs, num_pairs)
    text = "".join(k + v for k, v in pairs) + "." + "".join(k + v for k, v in queries)
    return {"text": text, "answer_spans": _answer_spans(text, queries), "pairs": [k + v for k, v in pairs],
            "num_pairs": num_pairs, "seed": seed}


def passkey_answer_span(text: str) -> List[int]:
    """The ``[start, end)`` span of the answer `` 12345.`` in a passkey training text: everything
    after the question, which is what ``eval_passkey.py`` asks a model to write from a prompt that
    ends with the question. The space and the period count: trained on the digits alone a model
    wrote its first digit where the space belongs, and trained without the period it did not stop
    after the key (``first_number`` then reads a longer number)."""
    at = text.rindex(PASSKEY_QUESTION) + len(PASSKEY_QUESTION)
    end = at + 1
    while end < len(text) and text[end].isdigit():
        end += 1
    if text[at:at + 1] != " " or end == at + 1 or text[end:end + 1] != ".":
        raise ValueError("no ' <key>.' after the question: not a passkey training text")
    return [at, end + 1]


def padded(text: str, length_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """``text`` with newlines appended up to ``length_tokens`` tokens (exact for the byte tokenizer):
    a training document of exactly the context length minus the end-of-document token starts every
    training window at a document start. A longer one would shift every later window of the
    trainer's packed stream off its document's start, so it is an error."""
    have = count_tokens(text)
    if have > length_tokens:
        raise ValueError(f"a training document of {have} tokens does not fit in {length_tokens}")
    return text + "\n" * (length_tokens - have)


def passkey_training_text(length_tokens: int, depth: float, seed: int,
                          count_tokens: Callable[[str], int]) -> str:
    """A passkey prompt and its answer in at most ``length_tokens`` tokens (``passkey_document``
    fits the prompt alone, the evaluation's input; the answer would run past the window)."""
    target = length_tokens
    while True:
        text = passkey_document(target, depth, seed, count_tokens)["text"]
        excess = count_tokens(text) - length_tokens
        if excess <= 0:
            return text
        target -= excess


def passkey_training_document(length_tokens: int, seed: int, count_tokens: Callable[[str], int]) -> Dict:
    """A passkey training document of exactly ``length_tokens`` tokens (``passkey_training_text`` with
    the needle at a depth drawn from ``seed``, then newlines), with ``answer_spans`` as the MQAR
    documents give them: the answer `` 12345.`` (``passkey_answer_span``)."""
    text = passkey_training_text(length_tokens, random.Random(seed).random(), seed, count_tokens)
    return {"text": padded(text, length_tokens, count_tokens), "answer_spans": [passkey_answer_span(text)]}


def copy_document(length_tokens: int, seed: int, count_tokens: Callable[[str], int],
                  chars: Tuple[int, int] = (5, 40)) -> str:
    """Lines ``Copy: <s>. Again: <s>.`` with random strings ``s`` of ``chars[0]..chars[1]`` letters and
    digits, as many lines as fit in ``length_tokens`` tokens (at least one)."""
    lo, hi = chars
    if not 1 <= lo <= hi:
        raise ValueError(f"copy string lengths must satisfy 1 <= min <= max, got {chars}")
    rng = random.Random(f"copy/{seed}/{length_tokens}/{lo}/{hi}")
    text = ""
    while True:
        s = "".join(rng.choice(COPY_ALPHABET) for _ in range(rng.randint(lo, hi)))
        line = f"Copy: {s}. Again: {s}.\n"
        if count_tokens(text + line) > length_tokens:
            if not text:
                raise ValueError(f"a copy line of {len(s)} characters does not fit in {length_tokens} tokens; "
                                 "use a longer length or shorter strings")
            return text
        text += line


def shortest_length(make: Callable[[int], object], longest: int) -> int:
    """The least length in ``1..longest`` for which ``make(length)`` does not raise ``ValueError``
    (the document generators raise it when their fixed parts do not fit)."""
    def fits(n: int) -> bool:
        try:
            make(n)
            return True
        except ValueError:
            return False

    if not fits(longest):
        make(longest)  # raises the generator's own message
    lo, hi = 1, longest
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo


def training_documents(num_docs: int, length_tokens: int, num_pairs: int, num_queries: int,
                       count_tokens: Callable[[str], int], seed_base: int = TRAIN_SEED_BASE,
                       mix: Sequence[str] = ("passkey", "mqar"), copy_chars: Tuple[int, int] = (5, 40),
                       min_length: Optional[int] = None) -> List[str]:
    """``num_docs`` documents, each padded to ``length_tokens`` tokens, of the kinds in ``mix`` in
    turn (document ``i`` is ``mix[i % len(mix)]``: passkey with depth uniform in [0, 1], MQAR, or
    copy), seeds ``seed_base + i`` (never an evaluation seed).

    ``min_length``: each document's own length (before the padding) is drawn uniformly from
    ``min_length`` (or the least its kind needs, if more) to ``length_tokens``; by default every
    document is as long as fits. Documents all of one length put every question at about the same
    position, which a model can learn instead of reading the context, and then fails at other lengths.
    """
    unknown = sorted(set(mix) - set(TASK_KINDS))
    if unknown or not mix:
        raise ValueError(f"document kinds must be a non-empty list of {TASK_KINDS}, got {list(mix)}")
    makers = {
        "passkey": lambda n, seed: passkey_training_text(n, random.Random(f"depth/{seed}").random(), seed,
                                                         count_tokens),
        "mqar": lambda n, seed: mqar_document(n, num_pairs, num_queries, seed, count_tokens)["text"],
        "copy": lambda n, seed: copy_document(n, seed, count_tokens, copy_chars),
    }
    least = {}
    if min_length is not None:
        least = {kind: max(min_length, shortest_length(lambda n: makers[kind](n, seed_base), length_tokens))
                 for kind in set(mix)}
    docs = []
    for i in range(num_docs):
        seed = seed_base + i
        kind = mix[i % len(mix)]
        n = random.Random(f"length/{seed}").randint(least[kind], length_tokens) if least else length_tokens
        docs.append(padded(makers[kind](n, seed), length_tokens, count_tokens))
    return docs


def token_segments(tokenizer, context: str, parts: Sequence[str]) -> Tuple[List[int], List[Tuple[int, int]]]:
    """Tokens of ``context + parts[0] + parts[1] + ...`` tokenized piece by piece, and each part's
    ``(start, end)`` token span (so evaluators locate the scored tokens with any tokenizer)."""
    ids = list(tokenizer.tokenize(context))
    spans = []
    for part in parts:
        piece = list(tokenizer.tokenize(part))
        spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    return ids, spans
