"""Loss by position on long documents: does the model use far context (loss keeps falling)?

Each document runs through the incremental engine in pieces (exact, memory bounded by one piece's
logits), so documents far longer than one forward fits can be scored.
"""
from __future__ import annotations

import json
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_rwkvx.evaluation.png import line_plot
from megatron_rwkvx.inference.engine import InferenceEngine


def read_documents(path: str, field: str = "text") -> Iterable[str]:
    """``.jsonl`` (one JSON object per line, text under ``field``) or any other file as one document."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if field not in row:
                    raise ValueError(f"{path}:{number} has no {field!r} field; pass --field to name it")
                yield row[field]
    else:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            yield f.read()


@torch.no_grad()
def token_losses(engine: InferenceEngine, ids: Sequence[int], piece_size: int = 4096) -> torch.Tensor:
    """Cross-entropy of each token ``ids[t+1]`` given ``ids[:t+1]``: ``[len(ids) - 1]`` fp32."""
    if len(ids) < 2:
        raise ValueError("a document needs at least 2 tokens to score")
    state = engine.new_state(1)
    target = torch.as_tensor(ids, dtype=torch.long)
    out = []
    for start in range(0, len(ids) - 1, piece_size):
        stop = min(start + piece_size, len(ids) - 1)
        logits = engine.forward(state, [list(ids[start:stop])])[0]
        out.append(F.cross_entropy(logits.float(), target[start + 1 : stop + 1].to(logits.device),
                                   reduction="none").cpu())
    return torch.cat(out)


def bucket_edges(max_length: int, first: int = 128, size: Optional[int] = None) -> List[int]:
    """Edges of position buckets: doubling from ``first`` (default) or every ``size`` tokens."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    edges = [0]
    step = first
    while edges[-1] < max_length - 1:
        nxt = edges[-1] + size if size else (step if edges[-1] == 0 else edges[-1] * 2)
        edges.append(min(nxt, max_length - 1))
    return edges


def losses_by_position(losses: Sequence[torch.Tensor], edges: Sequence[int]) -> List[Dict]:
    """Mean loss per bucket over every document long enough to reach it."""
    rows = []
    for lo, hi in zip(edges, edges[1:]):
        parts = [doc[lo:hi] for doc in losses if doc.numel() > lo]
        values = torch.cat(parts) if parts else torch.empty(0)
        rows.append({"start": lo, "end": hi, "tokens": int(values.numel()),
                     "documents": len(parts),
                     "loss": float(values.mean()) if values.numel() else float("nan")})
    return rows


def format_table(rows: Sequence[Dict]) -> str:
    lines = ["| positions | tokens | documents | loss | ppl |", "|---|---|---|---|---|"]
    for r in rows:
        ppl = float(torch.tensor(r["loss"]).exp()) if r["tokens"] else float("nan")
        lines.append(f"| {r['start']}-{r['end']} | {r['tokens']} | {r['documents']} | {r['loss']:.4f} | {ppl:.2f} |")
    return "\n".join(lines)


def plot_png(rows: Sequence[Dict], path: str) -> None:
    """Bucket mid-position (x) against mean loss (y)."""
    used = [r for r in rows if r["tokens"]]
    if not used:
        raise ValueError("no bucket has tokens; nothing to plot")
    line_plot([(r["start"] + r["end"]) / 2 for r in used], [r["loss"] for r in used]).save(path)
