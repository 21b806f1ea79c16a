"""A small real-text corpus from the Python standard library, and synthetic passkey documents.

Nothing is downloaded: the text is the documentation strings of standard-library modules
(English prose with code fragments), one document per documented module, class or function.
Passkey documents follow the reference evaluation (docs/design.md section 6): a filler paragraph
repeated to a target length with "The pass key is N. Remember it. N is the pass key." inserted
at a given depth, then the question.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import warnings
from typing import Callable, Iterator, List, Optional, Sequence

STDLIB_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar cmd codecs collections collections.abc "
    "concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib dis "
    "email email.message enum fileinput fnmatch fractions ftplib functools getopt gettext glob gzip "
    "hashlib heapq hmac html html.parser http.client http.cookies http.server imaplib inspect io "
    "ipaddress itertools json json.decoder logging logging.handlers lzma mailbox mimetypes "
    "multiprocessing numbers operator optparse os os.path pathlib pdb pickle pkgutil platform "
    "plistlib poplib pprint profile pstats queue quopri random re reprlib sched secrets selectors "
    "shelve shlex shutil signal smtplib socket socketserver sqlite3 statistics string struct "
    "subprocess symtable sysconfig tarfile tempfile textwrap threading timeit tokenize trace "
    "traceback types typing unittest unittest.mock urllib.parse urllib.request uuid warnings "
    "wave weakref xml.dom.minidom xml.etree.ElementTree zipfile zipimport zoneinfo"
).split()

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def stdlib_documents(min_chars: int = 200) -> Iterator[str]:
    """Documents in a fixed order: module docstring, then each public class/function's."""
    seen = set()
    for name in STDLIB_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except ImportError:  # optional modules (sqlite3, lzma, zoneinfo) may be missing
            continue
        items = [(name, module)]
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
                items.append((f"{name}.{attr}", obj))
                if inspect.isclass(obj):
                    for meth in sorted(vars(obj)):
                        m = vars(obj)[meth]
                        if not meth.startswith("_") and inspect.isfunction(m):
                            items.append((f"{name}.{attr}.{meth}", m))
        for qualname, obj in items:
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < min_chars or doc in seen:
                continue
            seen.add(doc)
            yield f"{qualname}\n\n{doc}\n"


def largest_fitting(build: Callable[[int], str], length_tokens: int, count_tokens: Callable[[str], int],
                    too_short: Callable[[int], str]) -> int:
    """The largest filler count ``reps`` with ``count_tokens(build(reps)) <= length_tokens``
    (``build`` grows with ``reps``); ``ValueError(too_short(minimum))`` when even 0 does not fit."""
    least = count_tokens(build(0))
    if least > length_tokens:
        raise ValueError(too_short(least))
    lo, hi = 0, max(1, length_tokens)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(build(mid)) <= length_tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo


def passkey_document(length_tokens: int, depth: float, seed: int,
                     count_tokens: Callable[[str], int]) -> dict:
    """Prompt of at most ``length_tokens`` tokens (by ``count_tokens``) with the needle at ``depth``."""
    key = random.Random(seed * 1_000_003 + length_tokens).randint(10000, 99999)
    needle = PASSKEY_NEEDLE.format(key=key)

    def build(reps: int) -> str:
        at = round(depth * reps)
        parts = [PASSKEY_INTRO] + [PASSKEY_FILLER] * at + [needle] + [PASSKEY_FILLER] * (reps - at) + [PASSKEY_QUESTION]
        return " ".join(parts)

    prompt = build(largest_fitting(build, length_tokens, count_tokens,
                                   lambda least: f"passkey length {length_tokens} tokens is below the minimum {least}"))
    answer = f" {key}."
    return {"text": prompt + answer, "prompt": prompt, "answer": str(key), "length_tokens": count_tokens(prompt),
            "target_length": length_tokens, "depth": depth, "seed": seed}


def write_corpus(output_dir: str, num_docs: Optional[int] = None, passkey_lengths: Sequence[int] = (),
                 passkey_depths: int = 10, passkey_seeds: int = 5, overwrite: bool = False,
                 count_tokens: Optional[Callable[[str], int]] = None) -> List[str]:
    """Write ``text.jsonl`` (and ``passkey.jsonl`` when lengths are given); returns the paths."""
    targets = [os.path.join(output_dir, "text.jsonl")]
    if passkey_lengths:
        targets.append(os.path.join(output_dir, "passkey.jsonl"))
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")
    os.makedirs(output_dir, exist_ok=True)
    docs = []
    for doc in stdlib_documents():
        if num_docs is not None and len(docs) >= num_docs:
            break
        docs.append(doc)
    _write_jsonl(targets[0], ({"text": d} for d in docs))
    if passkey_lengths:
        if count_tokens is None:
            from megatron_rwkvx.data.tokenizers import RWKVWorldTokenizer

            tok = RWKVWorldTokenizer()
            count_tokens = lambda s: len(tok.tokenize_array(s))  # noqa: E731
        depths = [i / max(1, passkey_depths - 1) for i in range(passkey_depths)]
        rows = (passkey_document(L, d, s, count_tokens) for L in passkey_lengths for d in depths
                for s in range(passkey_seeds))
        _write_jsonl(targets[1], rows)
    return targets


def _write_jsonl(path: str, rows) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
