"""How far a model copies, and whether its sparse blocks do the copying.

Copy documents (``retrieval_tasks.copy_document``: lines ``Copy: <s>. Again: <s>.``) with every string
of one length are scored teacher-forced on the second copy: loss and accuracy by string length show
where the recurrent state stops holding the string. For each copied token the weight that every
sparse layer puts on the source token to copy next (the attention an induction head gives) is
measured with the layer's own rule (``SelectionRecorder.attention_mass``): a sparse block that copies
puts most of its weight there; one that reads its selected chunks as a bag puts the even-spread
level beside it (1 / the number of keys it reads, where those hold the token).
"""
from __future__ import annotations

import re
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from megatron_rwkvx.data.retrieval_tasks import copy_document

_LINE = re.compile(r"(Copy: )(\S+)(\. Again: )(\S+)(\.\n)")
EVAL_SEED_BASE = 0  # training corpora use retrieval_tasks.TRAIN_SEED_BASE and up


def copy_prompt(tokenizer, context: int, chars: int, seed: int) -> Tuple[List[int], List[Tuple[int, int, int]]]:
    """Token ids of a copy document of ``context`` tokens whose strings all have ``chars`` characters,
    and per line ``(source_start, copy_start, length)`` in tokens (each piece tokenized apart, so the
    string is the same tokens in both places with any tokenizer)."""
    text = copy_document(context, EVAL_SEED_BASE + seed, lambda s: len(tokenizer.tokenize(s)), (chars, chars))
    ids: List[int] = []
    lines = []
    for m in _LINE.finditer(text):
        starts = []
        for piece in m.groups():
            starts.append(len(ids))
            ids += list(tokenizer.tokenize(piece))
        source, copy = starts[1], starts[3]
        lines.append((source, copy, starts[2] - source))
    return ids, lines


def score_copies(logits: torch.Tensor, ids: Sequence[int], lines) -> Tuple[float, float, int]:
    """Mean loss and accuracy of predicting each token of every second copy from ``logits`` [T, V]
    (position p predicts token p + 1), and the number of tokens scored."""
    targets = torch.tensor(ids)
    rows = torch.tensor([p for _, copy, n in lines for p in range(copy, copy + n)])
    pred = logits[rows - 1].float()
    loss = F.cross_entropy(pred, targets[rows], reduction="sum").item()
    correct = (pred.argmax(-1) == targets[rows]).sum().item()
    return loss / len(rows), correct / len(rows), len(rows)


def induction_weight(recorder, recorded, lines, even: bool = False) -> List[float]:
    """Per sparse layer, the mean over copied tokens of the largest (over heads) weight that copy
    position ``copy + i`` puts on source position ``source + i + 1``, the token to write next.
    ``even``: the same for heads that spread their weight evenly over the keys they read (the
    level of reading the selected chunks as a bag, ``SelectionRecorder.attention_mass``)."""
    per_token = [recorder.attention_mass(recorded, copy + i, [source + i + 1], even=even)
                 for source, copy, n in lines for i in range(n - 1)]
    return [sum(layer) / len(per_token) for layer in zip(*per_token)]


def run_copy_probe(engine, tokenizer, context: int, string_lengths: Sequence[int], seeds: int) -> List[Dict]:
    """One record per (string length, seed): loss, accuracy, and per sparse layer the induction
    weight and its even-spread level."""
    from megatron_rwkvx.evaluation.retrieval import SelectionRecorder

    records = []
    model = engine.model
    for chars in string_lengths:
        for seed in range(seeds):
            ids, lines = copy_prompt(tokenizer, context, chars, seed)
            if not lines:
                raise ValueError(f"a copy line of {chars} characters does not fit in {context} tokens")
            with SelectionRecorder(engine) as recorder, torch.no_grad():
                out = model(torch.tensor([ids]), position_ids=None, attention_mask=None)
                recorded = recorder.take(len(ids)) if recorder.mixers else []
            logits = (out[0] if isinstance(out, tuple) else out).reshape(len(ids), -1)
            loss, accuracy, scored = score_copies(logits, ids, lines)
            records.append({"chars": chars, "seed": seed, "tokens": scored, "loss": loss, "accuracy": accuracy,
                            "induction_weight": induction_weight(recorder, recorded, lines),
                            "even_weight": induction_weight(recorder, recorded, lines, even=True)})
    return records


def summarize(records: Sequence[Dict]) -> Dict[int, Dict]:
    """Per string length: token-weighted loss and accuracy; per layer the mean induction weight
    and its even-spread level over the documents."""
    out: Dict[int, Dict] = {}
    for chars in sorted({r["chars"] for r in records}):
        rows = [r for r in records if r["chars"] == chars]
        tokens = sum(r["tokens"] for r in rows)
        layer_means = lambda key: [sum(v) / len(rows) for v in zip(*(r[key] for r in rows))]  # noqa: E731
        out[chars] = {"tokens": tokens, "loss": sum(r["loss"] * r["tokens"] for r in rows) / tokens,
                      "accuracy": sum(r["accuracy"] * r["tokens"] for r in rows) / tokens,
                      "induction_weight": layer_means("induction_weight"), "even_weight": layer_means("even_weight")}
    return out


def format_copy_table(records: Sequence[Dict]) -> str:
    lines = ["| string length | tokens scored | loss (nats) | accuracy | induction weight per sparse layer "
             "(even spread over the keys read) |", "|---|---|---|---|---|"]
    layers = lambda ws: " / ".join(f"{w:.3f}" for w in ws)  # noqa: E731
    for chars, s in summarize(records).items():
        weights = f"{layers(s['induction_weight'])} ({layers(s['even_weight'])})" if s["induction_weight"] else "-"
        lines.append(f"| {chars} | {s['tokens']} | {s['loss']:.3f} | {s['accuracy']:.0%} | {weights} |")
    return "\n".join(lines)


def copy_png(records: Sequence[Dict], path: str) -> None:
    """Copy accuracy (y) by string length (x)."""
    from megatron_rwkvx.evaluation.png import line_plot

    stats = summarize(records)
    line_plot(list(stats), [s["accuracy"] for s in stats.values()]).save(path)
