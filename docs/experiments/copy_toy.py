"""Finding 9 of docs/retrieval_study.md: can each architecture, at the study's size, learn to copy?

An experiment record, not a tool (no tests; run it from the repository root with the package
installed). Each document is a random string s of --half symbols from an alphabet of --alphabet,
written twice (s ++ s); loss and teacher-forced accuracy are scored on the second copy, on 64 fixed
documents every 100 steps. Architectures: gpt-pos (learned absolute positions), gpt-rope, gpt-nope
(no positional information), and the package's RWKVXModel as rwkvx:PATTERN (sparse attention) or
rwkvx-dense:PATTERN (the same blocks with dense causal attention). Width 64, heads of 32, AdamW,
100 warm-up steps, cosine decay to 0.1x over --steps, clip 1.0."""
import argparse, json, math, time
import torch, torch.nn as nn, torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--arch", required=True)  # gpt-pos, gpt-nope, rwkvx:PATTERN, rwkvx-dense:PATTERN
p.add_argument("--alphabet", type=int, default=36)
p.add_argument("--half", type=int, default=128)
p.add_argument("--steps", type=int, default=1500)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--width", type=int, default=64)
p.add_argument("--head", type=int, default=32)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--chunk", type=int, default=64)
p.add_argument("--topk", type=int, default=3)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--out", default=None)
p.add_argument("--save", default=None)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
V = 64 if a.alphabet <= 64 else 256
T = 2 * a.half

class Block(nn.Module):
    def __init__(s, c, h):
        super().__init__(); s.h = h
        s.ln1, s.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        s.qkv = nn.Linear(c, 3 * c, bias=False); s.o = nn.Linear(c, c, bias=False)
        s.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
    def forward(s, x):
        b, t, c = x.shape
        q, k, v = s.qkv(s.ln1(x)).view(b, t, 3, c // s.h, s.h).permute(2, 0, 3, 1, 4)
        if ROPE:
            q, k = rope(q), rope(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + s.o(y.transpose(1, 2).reshape(b, t, c))
        return x + s.mlp(s.ln2(x))

ROPE = a.arch == "gpt-rope"
def rope(x):
    d = x.shape[-1]; t = x.shape[-2]
    f = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(t).float()[:, None] * f[None]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)

class GPT(nn.Module):
    def __init__(s, pos):
        super().__init__(); c = a.width
        s.emb = nn.Embedding(V, c); s.pos = nn.Embedding(T, c) if pos else None
        s.blocks = nn.ModuleList(Block(c, a.head) for _ in range(a.layers))
        s.ln = nn.LayerNorm(c); s.head = nn.Linear(c, V, bias=False)
    def forward(s, ids):
        x = s.emb(ids)
        if s.pos is not None: x = x + s.pos.weight[: ids.shape[1]]
        for b in s.blocks: x = b(x)
        return s.head(s.ln(x))

if a.arch.startswith("gpt"):
    model = GPT(a.arch == "gpt-pos")
else:
    kind, pattern = a.arch.split(":")
    from megatron_rwkvx.pretrained import prepare_runtime
    from megatron_rwkvx.config import RWKVXConfig
    from megatron_rwkvx.models.rwkvx_model import RWKVXModel
    prepare_runtime(torch.device("cpu"))
    cfg = RWKVXConfig(hidden_size=a.width, head_size=a.head, vocab_size=V, layer_pattern=pattern,
                      num_layers=len(pattern), sparse_chunk_size=a.chunk, sparse_top_k=a.topk,
                      attention_mode="dense" if kind == "rwkvx-dense" else "sparse",
                      use_cpu_initialization=True, params_dtype=torch.float32)
    model = RWKVXModel(cfg, parallel_output=False)
model.train()
nparam = sum(p.numel() for p in model.parameters())
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
warm = 100
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1, (i + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, a.steps) / a.steps))))
g = torch.Generator().manual_seed(1000 + a.seed)
def batch(n, gen):
    s = torch.randint(0, a.alphabet, (n, a.half), generator=gen)
    return torch.cat([s, s], 1)
def score(ids, logits):
    pred = logits[:, a.half:-1].argmax(-1); tgt = ids[:, a.half + 1:]
    loss = F.cross_entropy(logits[:, a.half:-1].reshape(-1, V), tgt.reshape(-1))
    return loss.item(), (pred == tgt).float().mean().item()
evalg = torch.Generator().manual_seed(999)
evalids = batch(64, evalg)
t0 = time.time(); log = []
for it in range(a.steps + 1):
    if it % 100 == 0 or it == a.steps:
        model.eval()
        with torch.no_grad(): l, acc = score(evalids, model(evalids))
        model.train()
        log.append((it, l, acc)); print(f"{a.arch} A={a.alphabet} it {it} loss2 {l:.3f} acc2 {acc:.3f} t {time.time()-t0:.0f}s", flush=True)
    if it == a.steps: break
    ids = batch(a.batch, g)
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
if a.save: torch.save(model.state_dict(), a.save)
res = dict(vars(a), params=nparam, log=log, wall=time.time() - t0)
if a.out: json.dump(res, open(a.out, "w"))
