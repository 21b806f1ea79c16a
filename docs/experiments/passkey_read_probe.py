"""Finding 19 of docs/retrieval_study.md: where does an RWKV-X model's attention look when it answers a
passkey, and does the answer depend on it?

An experiment record, not a tool (no tests; run it from the repository root with the package
installed). For each length and needle depth, passkey_document prompts with their right answer
appended are run teacher-forced through the model (load_pretrained, chunks of 64 and --top-k as the
evaluation reads), and it prints:
  - digits right (argmax at each of the five digits; also by digit, as is) and the mean margin of the right digit over the
    best other token, for the model as it is and with each attention block's output zeroed, and with
    all of them zeroed;
  - per attention block and head, how often the needle's chunk is among the chunks selected at the
    answer positions;
  - per attention block, the largest weight a head puts on the digit to copy (the same digit in the
    needle's first mention), read through the selection and with every chunk visible (dense).
--gate G multiplies the RWKV-7 blocks' change to the stream (RWKVXLayer.residual_gate), e.g. 0 to
read a model trained with its RWKV-7 blocks silenced (pretrain --rwkv-fade-in) as it trained.

  python docs/experiments/passkey_read_probe.py --model stage1.pth --lengths 1024,2048,4096 --depths 0,0.5
"""
import argparse
import statistics as st

import torch

import megatron_rwkvx
from megatron_rwkvx.data.sample_corpus import passkey_document
from megatron_rwkvx.data.tokenizers import ByteTokenizer
from megatron_rwkvx.evaluation.retrieval import SelectionRecorder
from megatron_rwkvx.inference import InferenceEngine
from megatron_rwkvx.kernels.sparse_attention.selection import topk_chunk_selection

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--lengths", default="1024,2048,4096")
p.add_argument("--depths", default="0,0.25,0.5,0.75")
p.add_argument("--seeds", type=int, default=3)
p.add_argument("--top-k", type=int, default=3)
p.add_argument("--gate", type=float, default=1.0)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
tok = ByteTokenizer()
CHUNK = 64
model = megatron_rwkvx.load_pretrained(a.model, sparse_chunk_size=CHUNK, sparse_top_k=a.top_k)
layers = model.decoder.layers
attn = [i for i, layer in enumerate(layers) if layer.symbol == "A"]
for layer in layers:
    if layer.symbol == "R":
        layer.residual_gate = a.gate
recorder = SelectionRecorder(InferenceEngine(model))  # q/k of the attention blocks, in order
zeroed = set()
for i in attn:
    def silence(module, inputs, output, _i=i):
        if _i in zeroed:
            (out, bias), v_first = output
            return (torch.zeros_like(out), bias), v_first

    layers[i].mixer.register_forward_hook(silence)


def score(ids, rows, answer):
    """Per digit: right or not; and the mean margin of the right digit over the best other token."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, rows].float()
    target = torch.tensor(answer)
    right = logits[torch.arange(len(rows)), target]
    others = logits.clone()
    others[torch.arange(len(rows)), target] = float("-inf")
    return (logits.argmax(-1) == target).float().tolist(), (right - others.max(-1).values).mean().item()


ablations = [("as is", set())] + [(f"A{i} zeroed", {i}) for i in attn] + [("all zeroed", set(attn))]
for length in [int(x) for x in a.lengths.split(",")]:
    overall = {"as is": [], "all zeroed": [], "by digit": [], "dense": {i: [] for i in attn}}
    for depth in [float(x) for x in a.depths.split(",")]:
        acc = {name: [] for name, _ in ablations}
        margin = {name: [] for name, _ in ablations}
        selected, sparse_w, dense_w = {}, {i: [] for i in attn}, {i: [] for i in attn}
        by_digit = []
        for seed in range(a.seeds):
            doc = passkey_document(length, depth, seed, lambda s: len(tok.tokenize(s)))
            prompt = tok.tokenize(doc["prompt"])
            answer = tok.tokenize(" " + doc["answer"])[1:]  # the digits; the prompt ends "The pass key is"
            ids = prompt + tok.tokenize(" ") + answer
            rows = [len(prompt) + j for j in range(len(answer))]  # row j predicts digit j
            first = doc["prompt"].index("The pass key is " + doc["answer"]) + len("The pass key is ")  # byte = token
            needle_chunks = {first // CHUNK, (first + len(answer) - 1) // CHUNK}
            for name, z in ablations:
                zeroed.clear()
                zeroed.update(z)
                if z:
                    x, y = score(ids, rows, answer)
                else:
                    with recorder:
                        x, y = score(ids, rows, answer)
                        recorded = recorder.take(len(ids))  # per attention block: q, k [T, heads, N]
                    by_digit.append(x)
                acc[name].append(st.mean(x))
                margin[name].append(y)
            # the model as it is: selection per head, weight on the digit to copy dense and as read
            for i, (q, k) in zip(attn, recorded):
                k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
                _, sel = topk_chunk_selection(q[None], k[None], chunk_size=CHUNK, top_k=a.top_k, q_offset=0)
                for j, t in enumerate(rows):
                    s = torch.einsum("hn,shn->hs", q[t], k[: t + 1]) * q.shape[-1] ** -0.5
                    dense_w[i].append(torch.softmax(s, -1)[:, first + j].max().item())
                    for h in range(q.shape[1]):
                        selected.setdefault((i, h), []).append(bool(set(sel[0, h, t].tolist()) & needle_chunks))
            for j, t in enumerate(rows):
                for i, weight in zip(attn, recorder.attention_mass(recorded, t, [first + j])):
                    sparse_w[i].append(weight)
            zeroed.clear()
        pct = lambda v: f"{100 * st.mean(v):.0f}%"  # noqa: E731
        print(f"length {length}, depth {depth:.2f}: digits right " + ", ".join(
            f"{name} {pct(acc[name])} ({st.mean(margin[name]):+.2f} nats)" for name, _ in ablations)
            + "; as is, by digit: " + " / ".join(pct(d) for d in zip(*by_digit)))
        print("   needle's chunk selected at the answer: " + " ".join(
            f"A{i}h{h} {pct(v)}" for (i, h), v in sorted(selected.items())))
        print("   weight on the digit to copy (largest head), read / dense: " + " ".join(
            f"A{i} {st.mean(sparse_w[i]):.3f} / {st.mean(dense_w[i]):.3f}" for i in attn), flush=True)
        overall["as is"] += acc["as is"]
        overall["all zeroed"] += acc["all zeroed"]
        overall["by digit"] += by_digit
        for i in attn:
            overall["dense"][i] += dense_w[i]
    print(f"length {length}, all depths: digits right as is {pct(overall['as is'])}, all zeroed "
          f"{pct(overall['all zeroed'])}; by digit " + " / ".join(pct(d) for d in zip(*overall["by digit"]))
          + "; dense weight on the digit to copy " + " ".join(f"A{i} {st.mean(v):.3f}" for i, v in overall["dense"].items()),
          flush=True)
