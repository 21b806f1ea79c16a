"""Passkey retrieval (docs/design.md section 6): filler text with a 5-digit key hidden at a depth, greedy
decoding, exact match of the first number generated. Prompts come from
``megatron_rwkvx.data.sample_corpus.passkey_document`` (the same text the sample corpus uses)."""
from __future__ import annotations

import contextlib
import re
from typing import Dict, List, Optional, Sequence

from megatron_rwkvx.data.sample_corpus import passkey_document
from megatron_rwkvx.evaluation.png import heatmap, short_number
from megatron_rwkvx.inference.engine import InferenceEngine
from megatron_rwkvx.evaluation.retrieval import (SelectionRecorder, format_read_weight_table, passkey_hits,
                                                 passkey_read_weight, split_recorded)
from megatron_rwkvx.inference.generation import generate

_NUMBER = re.compile(r"\d+")
READ_WEIGHT_NOTE = ("at each answer digit, the largest weight a head of the layer puts on that digit in the "
                    "needle (the token an induction head copies); in parentheses the level of a head that spreads "
                    "its weight evenly over the keys it reads.")


def depth_grid(count: int) -> List[float]:
    """``count`` depths from 0 (needle first) to 1 (needle last), as the sample corpus uses."""
    if count < 1:
        raise ValueError(f"need at least one depth, got {count}")
    return [i / max(1, count - 1) for i in range(count)]


def first_number(text: str) -> Optional[str]:
    m = _NUMBER.search(text)
    return m.group(0) if m else None


def run_passkey(engine: InferenceEngine, tokenizer, lengths: Sequence[int], depths: Sequence[float],
                seeds: int = 5, max_new_tokens: int = 8, piece_size: Optional[int] = 4096,
                progress=None, hit_rate: bool = False, read_weight: bool = False) -> List[Dict]:
    """One record per (length, depth, seed): prompt length, key, generated text, correct; with
    ``hit_rate`` also ``hits`` (per sparse layer: is a chunk holding the key attended from the
    last prompt position?), ``hit`` (in some layer) and ``hit_chance`` (the same for a random
    selection), see ``evaluation.retrieval``. With ``read_weight`` each prompt is also run once more
    with its right answer appended (teacher-forced) and the record gains ``read_weight`` and
    ``read_weight_even`` (``evaluation.retrieval.passkey_read_weight``): a selected chunk is not
    necessarily read, and an answer can come from the RWKV-7 state without any read."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")

    def count(text: str) -> int:
        return len(tokenizer.tokenize(text))

    recorder = SelectionRecorder(engine) if hit_rate or read_weight else None
    records = []
    for length in lengths:
        for depth in depths:
            docs = [passkey_document(length, depth, seed, count) for seed in range(seeds)]
            prompts = [tokenizer.tokenize(d["prompt"]) for d in docs]
            eod = tokenizer.eod  # 0 for RWKV World, 2 for a typical SentencePiece model
            with recorder if hit_rate else contextlib.nullcontext():
                outputs = generate(engine, prompts, max_new_tokens, stop_tokens=(eod,), prefill_piece=piece_size)
                recorded = recorder.take(sum(map(len, prompts))) if hit_rate and recorder.mixers else []
            per_prompt = split_recorded(recorded, [len(p) for p in prompts]) if recorded else [[]] * len(prompts)
            for doc, prompt, out, rec_qk in zip(docs, prompts, outputs, per_prompt):
                text = tokenizer.detokenize([t for t in out if t != eod])
                rec = {
                    "length": length, "depth": depth, "seed": doc["seed"], "prompt_tokens": len(prompt),
                    "answer": doc["answer"], "generated": text,
                    "correct": first_number(text) == doc["answer"],
                }
                if hit_rate:
                    rec.update(passkey_hits(recorder, tokenizer, doc["prompt"], prompt, doc["answer"], rec_qk)
                               if rec_qk else {"hits": [], "hit": False})
                if read_weight and recorder.mixers:
                    rec.update(_read_weight(engine, recorder, tokenizer, doc, prompt, piece_size))
                records.append(rec)
                if progress is not None:
                    progress(rec)
    return records


def _read_weight(engine: InferenceEngine, recorder: SelectionRecorder, tokenizer, doc: Dict,
                 prompt: Sequence[int], piece_size: Optional[int]) -> Dict:
    """The prompt and its right answer through the same incremental path, recorded."""
    continuation = tokenizer.tokenize(" " + doc["answer"])  # the prompt ends "The pass key is"
    ids = list(prompt) + list(continuation)
    with recorder:
        engine.prefill(engine.new_state(1), [ids], piece_size=piece_size)
        recorded = recorder.take(len(ids))
    return passkey_read_weight(recorder, tokenizer, doc["prompt"], prompt, continuation, doc["answer"], recorded)


def accuracy_grid(records: Sequence[Dict]):
    """(lengths, depths, grid[depth][length] accuracy in [0, 1])."""
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    grid = []
    for d in depths:
        row = []
        for n in lengths:
            hits = [r["correct"] for r in records if r["length"] == n and r["depth"] == d]
            row.append(sum(hits) / len(hits))
        grid.append(row)
    return lengths, depths, grid


def format_table(records: Sequence[Dict]) -> str:
    """Markdown table: one row per depth, one column per context length, plus the mean."""
    lengths, depths, grid = accuracy_grid(records)
    head = "| depth | " + " | ".join(f"{n}" for n in lengths) + " |"
    lines = [head, "|" + "---|" * (len(lengths) + 1)]
    for d, row in zip(depths, grid):
        lines.append(f"| {d:.0%} | " + " | ".join(f"{v:.0%}" for v in row) + " |")
    means = [sum(grid[j][i] for j in range(len(depths))) / len(depths) for i in range(len(lengths))]
    lines.append("| mean | " + " | ".join(f"{v:.0%}" for v in means) + " |")
    read = format_read_weight_table(records)
    if read:
        lines += ["", "Read weight (teacher-forced answer): " + READ_WEIGHT_NOTE, "", read]
    return "\n".join(lines)


def heatmap_png(records: Sequence[Dict], path: str) -> None:
    """Context length (x) by depth (y), red (0) to green (100%)."""
    lengths, depths, grid = accuracy_grid(records)
    heatmap(grid, [short_number(n) for n in lengths], [f"{d:.0%}" for d in depths]).save(path)
