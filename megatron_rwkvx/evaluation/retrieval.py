"""MQAR accuracy and chunk-selection hit rates, with exact incremental decoding.

MQAR (``megatron_rwkvx.data.retrieval_tasks.mqar_document``): each document is fed through the
inference engine (RWKV states + chunked KV cache, ``piece_size`` tokens per call), and a query is
correct when the greedy prediction of each value token, given the true text before it, is that
token: for the first token that is exactly greedy generation; for the following ones it is greedy
generation given a correct start, so a query counts as correct exactly when greedy generation
would have written the whole value. The true text is fed on, so one wrong answer does not change
the next query's context.

Hit rate: the sparse layers' queries and keys are recorded as the engine computes them, and for
the position that predicts the answer's first token the training selection rule
(``topk_chunk_selection``) is re-applied. A query hits in a layer when some head attends a chunk
holding the answer (a selected chunk or its own); ``hit`` is "in some sparse layer".
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

from megatron_rwkvx.data.retrieval_tasks import mqar_document, token_segments
from megatron_rwkvx.inference.engine import InferenceEngine


class SelectionRecorder:
    """Records the query and key projections of every sparse-attention layer of ``engine``'s
    model while it runs (forward hooks), one row at a time: use with single-row calls."""

    def __init__(self, engine: InferenceEngine):
        self.mixers = [layer.mixer for layer in engine.model.decoder.layers if hasattr(layer.mixer, "query")]
        cfg = engine.model.config
        self.chunk_size, self.top_k, self.selection = cfg.sparse_chunk_size, cfg.sparse_top_k, cfg.sparse_selection
        self._q: List[List[torch.Tensor]] = [[] for _ in self.mixers]
        self._k: List[List[torch.Tensor]] = [[] for _ in self.mixers]
        self._hooks = []

    def __enter__(self) -> "SelectionRecorder":
        for i, mixer in enumerate(self.mixers):
            self._hooks.append(mixer.query.register_forward_hook(self._keep(self._q[i])))
            self._hooks.append(mixer.key.register_forward_hook(self._keep(self._k[i])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @staticmethod
    def _keep(store):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            store.append(out.detach()[:, 0].float())  # [L, R=1, H*D] -> [L, H*D]
        return hook

    def reset(self) -> None:
        for store in self._q + self._k:
            store.clear()

    def take(self, num_tokens: int) -> List[tuple]:
        """Per sparse layer ``(q [T, Hq, D], k [T, Hkv, D])`` of the first ``num_tokens`` recorded
        positions (a prefill; later decode steps are dropped), then clear the record."""
        out = []
        for mixer, qs, ks in zip(self.mixers, self._q, self._k):
            d = mixer.head_size
            q = torch.cat(qs)[:num_tokens]
            k = torch.cat(ks)[:num_tokens]
            if q.shape[0] < num_tokens:
                raise ValueError(f"recorded {q.shape[0]} positions, asked for {num_tokens}")
            out.append((q.view(num_tokens, -1, d), k.view(num_tokens, -1, d)))
        self.reset()
        return out

    def _selected(self, q: torch.Tensor, k: torch.Tensor, position: int) -> List[List[int]]:
        """Per query head of one layer, the past chunks the training rule selects for ``position``."""
        from megatron_rwkvx.kernels.sparse_attention import topk_chunk_selection

        if self.top_k == 1 or position < self.chunk_size:
            return [[] for _ in range(q.shape[1])]
        _, sel = topk_chunk_selection(q[None, position : position + 1], k[None, : position + 1],
                                      chunk_size=self.chunk_size, top_k=self.top_k, q_offset=position,
                                      selection=self.selection)
        return [sorted({int(c) for c in head.tolist() if c >= 0}) for head in sel[0, :, 0]]

    def attended_chunks(self, recorded: List[tuple], position: int) -> List[set]:
        """Per sparse layer, the chunks some head attends from ``position``: its own and those
        the training rule selects."""
        own = position // self.chunk_size
        return [{own}.union(*self._selected(q, k, position)) for q, k in recorded]

    def _read_keys(self, q: torch.Tensor, k: torch.Tensor, position: int) -> List[torch.Tensor]:
        """Per query head, the key positions it reads from ``position``: its selected chunks and its
        own chunk up to itself."""
        c, own = self.chunk_size, position // self.chunk_size
        return [torch.cat([torch.arange(j * c, (j + 1) * c) for j in chunks] + [torch.arange(own * c, position + 1)])
                for chunks in self._selected(q, k, position)]

    def attention_weights(self, recorded: List[tuple], position: int, even: bool = False) -> List[List[tuple]]:
        """Per sparse layer, per query head, ``(keys, weights)``: the key positions that ``position``
        reads (own chunk causally plus the selected chunks) and the softmax over them, as the layer
        computes it. ``even``: the weights of a head that spread evenly over the same keys."""
        out = []
        for mixer, (q, k) in zip(self.mixers, recorded):
            group = q.shape[1] // k.shape[1]
            heads = []
            for h, keys in enumerate(self._read_keys(q, k, position)):
                if even:
                    weights = torch.full((len(keys),), 1.0 / len(keys))
                else:
                    weights = torch.softmax((k[keys, h // group] @ q[position, h]) * mixer.head_size ** -0.5, dim=0)
                heads.append((keys, weights))
            out.append(heads)
        return out

    def attention_mass(self, recorded: List[tuple], position: int, answer_positions: Sequence[int],
                       even: bool = False) -> List[float]:
        """Per sparse layer, the largest share over heads of the attention weight that ``position``
        puts on ``answer_positions`` (``attention_weights``). A hit says a chunk was selected; this
        says whether it is read. ``even``: the share if each head spread its weight evenly over the
        keys it reads (the same selection): the level of a head that reads what it selects as a bag."""
        wanted = torch.tensor(sorted(set(answer_positions)), dtype=torch.long)
        return [max((float(w[torch.isin(keys, wanted)].sum()) for keys, w in heads), default=0.0)
                for heads in self.attention_weights(recorded, position, even=even)]

    def chance(self, position: int, answer_positions: Sequence[int]) -> float:
        """The hit rate ("in some layer") if every head of every sparse layer picked its
        ``top_k - 1`` past chunks at random: the floor that a learned selection must beat."""
        own = position // self.chunk_size
        wanted = {p // self.chunk_size for p in answer_positions}
        if own in wanted or not self.mixers:
            return 1.0 if own in wanted else 0.0
        past, picks = own, min(self.top_k - 1, own)
        good = len({c for c in wanted if c < own})
        miss_one = math.comb(past - good, picks) / math.comb(past, picks) if past else 1.0
        heads = sum(m.local_heads for m in self.mixers)
        return 1.0 - miss_one ** heads

    def hits(self, recorded: List[tuple], position: int, answer_positions: Sequence[int],
             attended: Optional[List[set]] = None) -> List[bool]:
        """Per sparse layer: does a head attend a chunk holding one of ``answer_positions``?
        (``attended``: ``attended_chunks(recorded, position)`` when the caller has it already.)"""
        wanted = {p // self.chunk_size for p in answer_positions}
        if attended is None:
            attended = self.attended_chunks(recorded, position)
        return [bool(chosen & wanted) for chosen in attended]


def token_byte_offsets(tokenizer, ids: Sequence[int]) -> List[int]:
    """Byte offset in the decoded text where each token starts (exact for byte-level and RWKV
    World ids, which decode token by token to their bytes)."""
    offsets, at = [], 0
    for t in ids:
        offsets.append(at)
        at += len(tokenizer.detokenize([t]).encode("utf-8", errors="surrogateescape"))
    return offsets


def tokens_covering(offsets: Sequence[int], start: int, end: int) -> List[int]:
    """Indices of the tokens that overlap the byte range ``[start, end)``."""
    bounds = list(offsets[1:]) + [float("inf")]
    return [i for i, (a, b) in enumerate(zip(offsets, bounds)) if a < end and b > start]


def run_mqar(engine: InferenceEngine, tokenizer, lengths: Sequence[int], num_pairs: int, num_queries: int,
             seeds: int = 5, piece_size: Optional[int] = 4096, progress=None, key_letters: int = 2,
             alphabet: str = "letters") -> List[Dict]:
    """One record per (length, seed, query): the key, the value, what was predicted, correct, and
    per-layer selection hits (``hits``; empty for a model without sparse layers). ``key_letters``
    and ``alphabet``: ``mqar_document``'s (1: the curriculum's one-character keys)."""
    recorder = SelectionRecorder(engine)
    records = []
    for length in lengths:
        for seed in range(seeds):
            doc = mqar_document(length, num_pairs, num_queries, seed, lambda s: len(tokenizer.tokenize(s)),
                                key_letters=key_letters, alphabet=alphabet)
            parts = [p for key, value in doc["queries"] for p in (key, value)]
            ids, spans = token_segments(tokenizer, doc["context"], parts)
            context_bytes = doc["context"].encode("utf-8")
            offsets = token_byte_offsets(tokenizer, ids)
            # The whole pair list: a query whose selection lands there but not on its own pair looks in
            # the right region without telling the pairs apart (chunk keys are means over many pairs).
            listed = (context_bytes.find(doc["pairs"][0].encode("utf-8")),
                      context_bytes.find(doc["pairs"][-1].encode("utf-8")) + len(doc["pairs"][-1]))
            pair_list_tokens = tokens_covering(offsets, *listed)
            with recorder:
                state = engine.new_state(1)
                logits = engine.prefill(state, [ids], piece_size=piece_size, return_all=True)[0]
                recorded = recorder.take(len(ids)) if recorder.mixers else []
            predicted = logits.argmax(dim=-1).tolist()  # predicted[i] = greedy token after ids[:i+1]
            for q, (key, value) in enumerate(doc["queries"]):
                start, end = spans[2 * q + 1]
                guess = [predicted[i - 1] for i in range(start, end)]
                pair_at = context_bytes.find((key.strip() + value).encode("utf-8"))
                pair_tokens = tokens_covering(offsets, pair_at + len(key.strip()), pair_at + len(key.strip() + value))
                attended = recorder.attended_chunks(recorded, start - 1) if recorded else []
                hits = recorder.hits(recorded, start - 1, pair_tokens, attended)
                in_list = recorder.hits(recorded, start - 1, pair_list_tokens, attended)
                rec = {"length": length, "seed": seed, "prompt_tokens": len(ids), "key": key.strip(), "answer": value,
                       "generated": tokenizer.detokenize(guess), "correct": guess == ids[start:end],
                       "hits": hits, "hit": any(hits), "hit_chance": recorder.chance(start - 1, pair_tokens),
                       "pair_list_hit": any(in_list),
                       "pair_list_hit_chance": recorder.chance(start - 1, pair_list_tokens)}
                records.append(rec)
                if progress is not None:
                    progress(rec)
    return records


def split_recorded(recorded: List[tuple], lengths: Sequence[int]) -> List[List[tuple]]:
    """A record of several prompts fed one after another, cut into one record per prompt."""
    out, at = [], 0
    for n in lengths:
        out.append([(q[at : at + n], k[at : at + n]) for q, k in recorded])
        at += n
    return out


def byte_mentions(raw: bytes, key: bytes) -> List[int]:
    """Byte offsets of every occurrence of ``key`` in ``raw`` (overlapping ones included)."""
    found, at = [], raw.find(key)
    while at >= 0:
        found.append(at)
        at = raw.find(key, at + 1)
    return found


def passkey_hits(recorder: SelectionRecorder, tokenizer, prompt: str, ids: Sequence[int], answer: str,
                 recorded: List[tuple]) -> Dict:
    """``hits`` (per sparse layer: does the last prompt position attend a chunk holding the key,
    either of its two mentions in the needle?), ``hit`` and ``hit_chance`` (random selection)."""
    offsets = token_byte_offsets(tokenizer, ids)
    key = answer.encode("utf-8")
    wanted = [t for at in byte_mentions(prompt.encode("utf-8"), key)
              for t in tokens_covering(offsets, at, at + len(key))]
    hits = recorder.hits(recorded, len(ids) - 1, wanted)
    mass = recorder.attention_mass(recorded, len(ids) - 1, wanted)
    return {"hits": hits, "hit": any(hits), "hit_chance": recorder.chance(len(ids) - 1, wanted),
            "key_attention": mass}


def passkey_read_weight(recorder: SelectionRecorder, tokenizer, prompt: str, prompt_ids: Sequence[int],
                        continuation_ids: Sequence[int], answer: str, recorded: List[tuple]) -> Dict:
    """How much the sparse layers read the key where they answer: ``recorded`` is the record of
    ``prompt_ids + continuation_ids`` (the prompt and the right answer, teacher-forced). For each answer
    token that holds bytes of the key, the position that predicts it puts (per layer, the largest over
    heads, ``SelectionRecorder.attention_mass``) this weight on the needle tokens holding the same bytes
    of the key, in either mention: the token an induction head copies. ``read_weight`` is its mean over
    the answer's tokens per sparse layer; ``read_weight_even`` the same for heads that spread their
    weight evenly over the keys they read (a bag read of the same selection)."""
    key = answer.encode("utf-8")
    offsets = token_byte_offsets(tokenizer, prompt_ids)
    mentions = byte_mentions(prompt.encode("utf-8"), key)
    continuation = b"".join(tokenizer.detokenize([t]).encode("utf-8", errors="surrogateescape")
                            for t in continuation_ids)
    start = continuation.find(key)
    if not mentions or start < 0:
        raise ValueError(f"the key {answer!r} must appear in the prompt and in the continuation")
    cont_offsets = token_byte_offsets(tokenizer, continuation_ids)
    bounds = cont_offsets[1:] + [len(continuation)]
    read, even = [], []
    for j, (a, b) in enumerate(zip(cont_offsets, bounds)):
        lo, hi = max(a, start) - start, min(b, start + len(key)) - start  # key bytes in this token
        if lo >= hi:
            continue
        wanted = [t for m in mentions for t in tokens_covering(offsets, m + lo, m + hi)]
        position = len(prompt_ids) + j - 1  # predicts continuation token j
        read.append(recorder.attention_mass(recorded, position, wanted))
        even.append(recorder.attention_mass(recorded, position, wanted, even=True))
    mean = lambda rows: [sum(layer) / len(rows) for layer in zip(*rows)]  # noqa: E731
    return {"read_weight": mean(read), "read_weight_even": mean(even)}


def read_weight_by_length(records: Sequence[Dict]) -> Dict[int, Dict[str, List[float]]]:
    """``{length: {"read_weight", "read_weight_even"}}``: per sparse layer, the mean over the
    records of that length that have them (``passkey_read_weight``)."""
    out = {}
    for n in sorted({r["length"] for r in records}):
        rows = [r for r in records if r["length"] == n and r.get("read_weight")]
        if rows:
            out[n] = {k: [sum(v) / len(rows) for v in zip(*(r[k] for r in rows))]
                      for k in ("read_weight", "read_weight_even")}
    return out


def format_read_weight_table(records: Sequence[Dict]) -> str:
    """Markdown, one row per length: the read weight per sparse layer (its even-spread level), or ""
    when no record has one."""
    stats = read_weight_by_length(records)
    if not stats:
        return ""
    layers = lambda ws: " / ".join(f"{w:.3f}" for w in ws)  # noqa: E731
    lines = ["| length | weight on the key token to copy, per sparse layer (even spread over the keys read) |",
             "|---|---|"]
    lines += [f"| {n} | {layers(s['read_weight'])} ({layers(s['read_weight_even'])}) |" for n, s in stats.items()]
    return "\n".join(lines)


def accuracy_by_length(records: Sequence[Dict]) -> Dict[int, Dict[str, float]]:
    """``{length: {"accuracy", "hit_rate", "hit_chance" (None without sparse layers), "count"}}``
    (MQAR or passkey records); MQAR records add ``pair_list_hit_rate`` and its chance."""
    out = {}
    for n in sorted({r["length"] for r in records}):
        rows = [r for r in records if r["length"] == n]
        with_hits = [r for r in rows if r.get("hits")]
        out[n] = {"accuracy": sum(r["correct"] for r in rows) / len(rows),
                  "hit_rate": (sum(r["hit"] for r in with_hits) / len(with_hits)) if with_hits else None,
                  "hit_chance": (sum(r["hit_chance"] for r in with_hits) / len(with_hits)) if with_hits else None,
                  "count": len(rows)}
        if with_hits and "pair_list_hit" in with_hits[0]:
            out[n]["pair_list_hit_rate"] = sum(r["pair_list_hit"] for r in with_hits) / len(with_hits)
            out[n]["pair_list_hit_chance"] = sum(r["pair_list_hit_chance"] for r in with_hits) / len(with_hits)
    return out


def format_table(records: Sequence[Dict]) -> str:
    """Markdown: one row per context length, accuracy and selection hit rate."""
    stats = accuracy_by_length(records)
    listed = any("pair_list_hit_rate" in s for s in stats.values())
    lines = ["| length | queries | accuracy | selection hit rate | hit rate of a random selection |"
             + (" pair-list hit rate (random) |" if listed else ""),
             "|---|---|---|---|---|" + ("---|" if listed else "")]
    pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
    for n, s in stats.items():
        row = f"| {n} | {s['count']} | {s['accuracy']:.0%} | {pct(s['hit_rate'])} | {pct(s['hit_chance'])} |"
        if listed:
            row += f" {pct(s.get('pair_list_hit_rate'))} ({pct(s.get('pair_list_hit_chance'))}) |"
        lines.append(row)
    return "\n".join(lines)


def accuracy_png(records: Sequence[Dict], path: str) -> None:
    """Accuracy (y) by context length (x)."""
    from megatron_rwkvx.evaluation.png import line_plot

    stats = accuracy_by_length(records)
    line_plot(list(stats), [s["accuracy"] for s in stats.values()]).save(path)
