"""Findings 19-21 of docs/retrieval_study.md: MQAR in the study's layout, but with one-letter keys, so that a
key is named by one token (what RWKV-X's attention learned in the toy, findings 13-18).

An experiment record, not a tool (no tests; run it from the repository root with the package
installed). A document is ``Remember these pairs: d8 t5 ... n8. <filler paragraphs, as many as fit> Recall: p4 e0 ...``:
the 26 lowercase letters as keys in random order, each with a one-digit value, then every key asked
once in another random order, padded with newlines to its length (256-511 bytes when made for
training, seeds 9,000,000 + i; evaluation uses seeds 0..N-1, ``--seeds N``, default 6). ``--keys 52``
(finding 22) uses the uppercase letters too, so that the pairs outgrow the RWKV-7 control's state.

  python docs/experiments/mqar_one_letter.py make 20000 mqar1.jsonl [--length 511] [--layout L]   # then tools/preprocess_data.py
  python docs/experiments/mqar_one_letter.py census data/mq_text_document [--seq-length 512] [--windows 19200]
  python docs/experiments/mqar_one_letter.py eval model.pth [--gate 0] [--lengths 500] [--top-k 8] [--seeds 6] [--selection quest]
  python docs/experiments/mqar_one_letter.py plot out.png --train-length 512 "RWKV-7 control=eval_c.log" "RWKV-X=eval_x.log" ...

``make --layout`` (finding 20; these need ``--length``): ``study`` (the above); ``no-filler`` (the
same without filler, newlines after the questions); ``compact`` (the toy's layout in bytes:
``d8t5...n8.p4e0...``, 105 bytes, no header, filler or spaces, newlines after); ``compact-apart``
(``d8t5...n8``, newlines, then ``.p4e0...`` at the document's end).

``census`` reads the training windows as the trainer samples them (seed 1234, split 98,2,0) and
counts the asked values whose own pair list is in the window and no other (clean), whose own list
is cut off (orphan), or whose key is also in another document's list in the window (conflicted:
attention without positions cannot tell the two apart).

``eval`` (``--lengths 200``: the documents have no filler, as ``no-filler``'s) scores the asked values teacher-forced (chance 10%) and prints, per attention block, the
largest weight a head puts on the asked pair's value in the pair list, with every chunk visible and
read through top-k of chunks of 64, and how often a head selects the chunk that holds it (the
hit rate: by some head, beside the rate at which a random selection would, in some block; and by
the head that puts the most dense weight on the value), and for how many of the keys the mean
dense weight on the value is above 0.5 (finding 21: 8 of 26 without the curriculum). ``--selection
quest`` (finding 21) reads with each chunk scored by Quest's bound instead of its mean key (the
package's ``sparse_selection``; finding 21 patched the selection functions the same way before the
option existed), whatever rule the model was trained with; ``--top-k`` beyond the chunk count reads
every chunk.
"""
import argparse
import json
import random
import statistics as st
import string

from megatron_rwkvx.data.retrieval_tasks import MQAR_HEADER, MQAR_RECALL
from megatron_rwkvx.data.sample_corpus import PASSKEY_FILLER
from megatron_rwkvx.kernels.sparse_attention.selection import SELECTION_RULES

TRAIN_SEEDS = 9_000_000


KEY_SETS = {26: string.ascii_lowercase, 52: string.ascii_lowercase + string.ascii_uppercase}


def one_letter_pairs(rng: random.Random, keys: int = 26) -> tuple:
    """The 26 lowercase letters (``keys`` 52: and the 26 uppercase ones) in random order, each with a
    one-digit value, and the same pairs in the order they are asked."""
    keys = list(KEY_SETS[keys])
    rng.shuffle(keys)
    pairs = [(k, str(rng.randrange(10))) for k in keys]
    return pairs, rng.sample(pairs, len(pairs))


def document(seed: int, length: int, keys: int = 26) -> dict:
    """``context`` (pairs, filler, ``Recall:``), ``asked``, ``pairs`` ([(key, value)]) and ``text``:
    the context and then `` key value`` per asked pair, at most ``length`` bytes."""
    pairs, asked = one_letter_pairs(random.Random(f"mqar1/{seed}" if keys == 26 else f"mqar1/{keys}/{seed}"), keys)
    head = MQAR_HEADER + " " + " ".join(k + v for k, v in pairs) + "."
    tail = "".join(" " + k + v for k, v in asked)
    reps = 0
    while len(" ".join([head] + [PASSKEY_FILLER] * (reps + 1) + [MQAR_RECALL]) + tail) <= length:
        reps += 1
    context = " ".join([head] + [PASSKEY_FILLER] * reps + [MQAR_RECALL])
    return {"context": context, "asked": asked, "pairs": pairs, "text": context + tail}


def compact_document(seed: int, keys: int = 26) -> tuple:
    """The toy's layout in bytes: the pair list and the questions, each ``k v`` without spaces."""
    pairs, asked = one_letter_pairs(random.Random(f"mqar1c/{seed}" if keys == 26 else f"mqar1c/{keys}/{seed}"), keys)
    return "".join(k + v for k, v in pairs), "." + "".join(k + v for k, v in asked)


def make(count: int, path: str, length: int = 0, layout: str = "study", keys: int = 26) -> None:
    """``length`` 0: 256-511 bytes each, so that the trainer's windows hold parts of two documents;
    otherwise every document is exactly ``length`` bytes (with its end-of-document token, one
    window of ``length + 1`` each)."""
    if layout != "study" and not length:
        raise SystemExit(f"--layout {layout} needs --length")
    fixed = length
    with open(path, "w") as f:
        for i in range(count):
            length = fixed or random.Random(TRAIN_SEEDS + i).randint(256, 511)
            if layout in ("study", "no-filler"):
                doc = document(TRAIN_SEEDS + i, length if layout == "study" else 200, keys)
                text, first = doc["text"], len(doc["context"]) + 2  # " k v": the value 2 after the space
                step = 3
            else:
                pairs, questions = compact_document(TRAIN_SEEDS + i, keys)
                gap = length - len(pairs) - len(questions) if layout == "compact-apart" else 0
                text = pairs + "\n" * gap + questions
                first, step = len(pairs) + gap + 2, 2  # ".kv...": the first value 2 after the "."
            if len(text) > length:
                raise SystemExit(f"a {layout} document needs {len(text)} bytes; --length {length} is too short")
            # The asked values as [start, end) spans: preprocess_data.py --loss-spans-key answers
            # marks them for pretrain --loss-on-spans (the answer loss of answer_loss_pretrain.py).
            answers = [[j, j + 1] for j in range(first, len(text), step)]
            assert all(text[a].isdigit() for a, _ in answers)
            f.write(json.dumps({"text": text + "\n" * (length - len(text)), "answers": answers}) + "\n")


def census(prefix: str, seq_length: int, windows: int) -> None:
    import collections
    import re

    from megatron_rwkvx.data.datasets import build_gpt_datasets
    from megatron_rwkvx.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    train = build_gpt_datasets([prefix], "98,2,0", seq_length, 1234, [windows, None, None], None, tok)[0]
    counts = collections.Counter()
    for i in range(windows):
        ids = train[i]["tokens"].tolist()
        cuts = [-1] + [j for j, t in enumerate(ids) if t == tok.eod] + [len(ids)]
        texts = [bytes(ids[a + 1:b]).decode("latin1") for a, b in zip(cuts, cuts[1:])]
        lists = {}  # document in the window -> its pair list, where the whole list is there
        for j, text in enumerate(texts):
            m = re.search(MQAR_HEADER + r" ((?:[A-Za-z]\d ?)+)\.", text)
            if m:
                lists[j] = dict((p[0], p[1]) for p in m.group(1).split())
        for j, text in enumerate(texts):
            at = text.find(MQAR_RECALL)
            for m in re.finditer(r" ([A-Za-z])\d", text[at:] if at >= 0 else ""):
                others = [d for jj, d in lists.items() if jj != j and m.group(1) in d]
                counts["orphan" if j not in lists else "conflicted" if others else "clean"] += 1
    total = sum(counts.values())
    print(f"{prefix}: {windows} windows of {seq_length}, {total} asked values ({total / windows:.1f} per window): "
          + ", ".join(f"{k} {v} ({100 * v / total:.1f}%)" for k, v in counts.most_common()))


def evaluate(path: str, lengths, gate: float, top_k: int, threads: int, seeds: int = 6, num_keys: int = 26,
             selection=None, chunk_size: int = 64) -> None:
    import torch

    import megatron_rwkvx
    from megatron_rwkvx.data.tokenizers import ByteTokenizer
    from megatron_rwkvx.evaluation.retrieval import SelectionRecorder
    from megatron_rwkvx.inference import InferenceEngine

    torch.set_num_threads(threads)
    tok = ByteTokenizer()
    # selection None: the rule the model was trained with (its .pth.json; older exports: mean)
    model = megatron_rwkvx.load_pretrained(path, sparse_chunk_size=chunk_size, sparse_top_k=top_k,
                                           **({"sparse_selection": selection} if selection else {}))
    attn = [i for i, layer in enumerate(model.decoder.layers) if layer.symbol == "A"]
    for layer in model.decoder.layers:
        if layer.symbol == "R":
            layer.residual_gate = gate
    recorder = SelectionRecorder(InferenceEngine(model))  # q/k of the attention blocks, in order
    for length in lengths:
        acc, read, hit, chance = [], {i: [] for i in attn}, {i: [] for i in attn}, []
        own_hit = {i: [] for i in attn}  # the head that puts the most dense weight on the value
        by_key = {i: {} for i in attn}  # key letter -> the largest dense weight a head puts on its value
        for seed in range(seeds):
            d = document(seed, length, num_keys)
            text = d["text"]
            ids = tok.tokenize(text)  # byte = token
            with recorder, torch.no_grad():
                logits = model(torch.tensor([ids]))[0]
                recorded = recorder.take(len(ids))
            value_at = {k: text.index(" " + k + v) + 2 for k, v in d["pairs"]}  # the pair list comes first
            for j, (k, v) in enumerate(d["asked"]):
                pos = len(d["context"]) + 3 * j + 1  # the asked key; it predicts the value
                acc.append(float(logits[pos].argmax().item() == ord(v)))
                # per head, the keys it reads through the selection and their weights, once per
                # question: the read weight and the hit come from these, where attention_mass and
                # hits would each run the selection again
                read_keys = recorder.attention_weights(recorded, pos)
                for i, (q, keys), heads in zip(attn, recorded, read_keys):
                    keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], 1)
                    s = torch.einsum("hn,shn->hs", q[pos], keys[: pos + 1]) * q.shape[-1] ** -0.5
                    on_value = torch.softmax(s, -1)[:, value_at[k]]
                    by_key[i].setdefault(k, []).append(on_value.max().item())
                    own_hit[i].append(float(value_at[k] in heads[int(on_value.argmax())][0]))
                    read[i].append(max(float(w[keys_read == value_at[k]].sum()) for keys_read, w in heads))
                    hit[i].append(float(any(value_at[k] in keys_read for keys_read, _ in heads)))
                chance.append(recorder.chance(pos, [value_at[k]]))
        line = f"{path} gate {gate} selection {model.config.sparse_selection} chunk {chunk_size} top-{top_k} length {length}: accuracy {100 * st.mean(acc):.1f}% (chance 10%)"
        if attn:
            dense = {i: [w for ws in by_key[i].values() for w in ws] for i in attn}
            line += ("; weight on the asked value, dense: " + " ".join(f"A{i} {st.mean(dense[i]):.3f}" for i in attn)
                     + f"; read through top-{top_k}: " + " ".join(f"A{i} {st.mean(read[i]):.3f}" for i in attn)
                     + "; hit rate on the asked value's chunk, some head: "
                     + " ".join(f"A{i} {100 * st.mean(hit[i]):.0f}%" for i in attn)
                     + f" (random selection, some block: {100 * st.mean(chance):.0f}%), the head with the most dense "
                     "weight on it: " + " ".join(f"A{i} {100 * st.mean(own_hit[i]):.1f}%" for i in attn)
                     + "; keys read (mean dense weight > 0.5): "
                     + " ".join(f"A{i} {sum(st.mean(w) > 0.5 for w in by_key[i].values())}/{len(by_key[i])}" for i in attn))
        print(line, flush=True)


def plot(path: str, series, train_length: int, title: str) -> None:
    """Accuracy against evaluation length, one line per ``LABEL=LOG`` (the output of ``eval``)."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    lengths = set()
    for item in series:
        label, log = item.split("=", 1)
        points = sorted((int(n), float(a)) for n, a in re.findall(r"length (\d+): accuracy ([\d.]+)%", open(log).read()))
        if not points:
            raise SystemExit(f"{log} holds no 'length N: accuracy X%' lines")
        ax.plot(*zip(*points), marker="o", label=label)
        lengths.update(n for n, _ in points)
    ax.axvline(train_length, color="grey", linestyle=":", label=f"training length ({train_length})")
    ax.axhline(10, color="grey", linestyle="--", linewidth=0.8, label="chance (10%)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(lengths), [str(n) for n in sorted(lengths)])
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("MQAR accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("count", type=int)
    m.add_argument("path")
    m.add_argument("--length", type=int, default=0)
    m.add_argument("--layout", choices=["study", "no-filler", "compact", "compact-apart"], default="study")
    m.add_argument("--keys", type=int, choices=sorted(KEY_SETS), default=26)
    c = sub.add_parser("census")
    c.add_argument("prefix")
    c.add_argument("--seq-length", type=int, default=512)
    c.add_argument("--windows", type=int, default=19200)
    e = sub.add_parser("eval")
    e.add_argument("model")
    e.add_argument("--lengths", default="500")
    e.add_argument("--gate", type=float, default=1.0)
    e.add_argument("--top-k", type=int, default=8)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--seeds", type=int, default=6, help="documents per length (evaluation seeds 0..N-1)")
    e.add_argument("--selection", choices=SELECTION_RULES, default=None,
                   help="read the model through this chunk selection rule (the package's sparse_selection); "
                        "default: the one it was trained with")
    e.add_argument("--keys", type=int, choices=sorted(KEY_SETS), default=26)
    e.add_argument("--chunk-size", type=int, default=64,
                   help="read the model through chunks of this many tokens (the models here trained with 64)")
    f = sub.add_parser("plot")
    f.add_argument("output")
    f.add_argument("series", nargs="+", help="LABEL=LOG: a line per eval log")
    f.add_argument("--train-length", type=int, default=512)
    f.add_argument("--title", default="One-letter MQAR")
    a = p.parse_args()
    if a.cmd == "plot":
        plot(a.output, a.series, a.train_length, a.title)
    elif a.cmd == "make":
        make(a.count, a.path, a.length, a.layout, a.keys)
    elif a.cmd == "census":
        census(a.prefix, a.seq_length, a.windows)
    else:
        evaluate(a.model, [int(x) for x in a.lengths.split(",")], a.gate, a.top_k, a.threads, a.seeds, a.keys,
                 a.selection, a.chunk_size)
