"""Findings 9-20 of docs/retrieval_study.md: can each architecture, at the study's size, learn to copy
or to recall by key?

An experiment record, not a tool (no tests; run it from the repository root with the package
installed). Each document is a random string s of --half symbols from an alphabet of --alphabet,
written twice (s ++ s), or with --gap G separated by 0..G filler symbols (then no fixed offset
names the source: only content does); loss and teacher-forced accuracy are scored on the second
copy after its first symbol, on 64 fixed documents every 100 steps. Architectures: gpt-pos
(learned absolute positions), gpt-rope, gpt-nope (no positional information), gpt-shift (no
positions, RWKV's token shift on the attention's input), and the package's RWKVXModel as
rwkvx:PATTERN (sparse attention) or rwkvx-dense:PATTERN (the same blocks with dense causal
attention). --base loads an rwkvx:R...R --save file into the pattern's R blocks in order, the
sparse blocks keeping the model's own init (zero output, so the start is the base, as after the
package's zero-init expansion, which works on the reference file layout instead) and --train-only sparse freezes all but the sparse blocks (stage 1, the package's
freeze_for_stage1); --probe N prints each sparse layer's induction weight (copy_probe's measure) and where
each head's weight goes (entropy, weight on the first copy); --ablate, the accuracy when the
sparse blocks read less (top-k 1, chunks of 16, output zeroed).
--task mqar (finding 11) replaces the copy with multi-query associative recall: --pairs N distinct
keys (of --keys ids) each followed by a value (of --values ids, chance 1/values), then the same N
pairs in a random order, so T = 4N and only a key's content leads to its value; the value after each
asked key is scored. --train-loss scored trains on those targets only (Zoology's MQAR loss; the
default, all, trains on every next token). For mqar, --probe N prints per sparse layer the hit rate
of the heads' selected chunks on the asked pair beside a random selection's, and the largest share
over heads of the softmax weight on the pair's two positions beside the even level, and the share
of the selected past chunks that lie in the pair list beside a random selection's.
--attn-shift (finding 13) builds the rwkvx/rwkvx-dense model with the package's sparse_token_shift:
RWKV's token shift on the sparse blocks' query/key/value inputs. --load of a dense-trained file
into the sparse arch of the same pattern continues it with the top-k selection.
Finding 15 (not in the package): --select-score scores each past chunk by Quest's bound (per channel
the larger of q*max and q*min over its keys) or by its best key (max of q.k over the chunk, exact but
as costly as dense scores) instead of MoBA's mean key, in training, probe and ablation alike;
--select-loss W adds W x the KL from the dense attention's mass on each past chunk (detached) to a
softmax of the mean-key scores, averaged over queries with two or more past chunks and over layers.
Finding 16: --shift-init rwkv starts the --attn-shift mixes as an RWKV-7 first block's x_r/x_k/x_v
(a per-channel ramp from the previous token to the current one) instead of 0.5; --qk-scale S
redraws the A blocks' query/key weights from U(+-S/sqrt(width)). The package drew them at 0.5 for
findings 9-15 and at 1.0 since finding 16 (SPARSE_QK_INIT_SCALE): --qk-scale 0.5 gives the earlier
scale (a fresh draw, so not the earlier runs' exact weights); --train-only not-rwkv freezes only
the R blocks (at init they are the identity: their outputs start at zero); --probe-tokens prints,
per block, how well a linear classifier names each position's token from the block's mixer input
(held out) and the share of that input's variance the token explains.
Finding 17: --rwkv-lr-scale X trains the R blocks at X times --lr; --select-score shortlist keeps
the --shortlist past chunks with the best mean-key scores and among them picks by the best key.
Finding 18: --attn-out-gain G multiplies the A blocks' attention output by G; --expand-init copy
(with --base) makes the A blocks as the package's expansion does with --init copy; --rwkv-gate S0,S1
multiplies the R blocks' change to the stream by 0 until step S0, rising linearly to 1 at S1 (the
package's --rwkv-fade-in, through RWKVXLayer.residual_gate; --rwkv-gate-blocks: only those pattern
positions), and the probe and ablations read at the gate training ended with.
Finding 20: --init-model M (mqar, rwkvx) starts from a package .pth of the byte tokenizer (e.g. the
study's expanded model), or a .pt state dict of that model, instead of a fresh model or --base, the
task written in its bytes (keys as letters, values as digits); --a-blocks-from M takes only the A
blocks' weights from such a file (after --base and --qk-scale).
Width 64, heads of 32, AdamW, 100 warm-up steps, cosine decay to 0.1x over --steps, clip 1.0."""
import argparse, json, math, time
import torch, torch.nn as nn, torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--arch", required=True)  # gpt-pos, gpt-rope, gpt-nope, gpt-shift, rwkvx:PATTERN, rwkvx-dense:PATTERN
p.add_argument("--alphabet", type=int, default=36)
p.add_argument("--half", type=int, default=128)
p.add_argument("--gap", type=int, default=0)  # filler of random length 0..gap between the copies
p.add_argument("--task", choices=["copy", "mqar"], default="copy")
p.add_argument("--pairs", type=int, default=64)  # mqar: key-value pairs, then every key asked once in random order
p.add_argument("--keys", type=int, default=192)  # mqar: key ids 0..keys-1, distinct within a document
p.add_argument("--values", type=int, default=64)  # mqar: value ids keys..keys+values-1 (chance 1/values)
p.add_argument("--train-loss", choices=["all", "scored"], default="all")  # scored: train on the scored targets only (Zoology's MQAR loss)
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
p.add_argument("--load", default=None)  # a --save file of the same --arch: evaluate or train on from it
p.add_argument("--base", default=None)  # a --save file of rwkvx:R...R: its blocks fill this pattern's R blocks in order (the expansion)
p.add_argument("--train-only", choices=["all", "sparse", "not-rwkv"], default="all")  # sparse: stage 1, the package's freeze; not-rwkv: all but the R blocks (finding 16)
p.add_argument("--rwkv-lr-scale", type=float, default=1.0)  # rwkvx: the R blocks learn at this multiple of --lr (finding 17)
p.add_argument("--ablate", action="store_true")  # after training: eval accuracy when the sparse blocks read less
p.add_argument("--attn-shift", action="store_true")  # rwkvx: token shift on the sparse blocks' q/k/v inputs (not the reference)
p.add_argument("--shift-init", choices=["half", "rwkv"], default="half")  # rwkvx --attn-shift: mixes at 0.5 (the package's) or RWKV-7's per-channel ramp (finding 16)
p.add_argument("--qk-scale", type=float, default=None)  # rwkvx: redraw the A blocks' query/key weights U(+-s/sqrt(width)) (finding 16; the package's SPARSE_QK_INIT_SCALE otherwise)
p.add_argument("--select-score", choices=["mean", "quest", "max", "shortlist"], default="mean")  # rwkvx: the chunk score (mean: MoBA's, the package's)
p.add_argument("--shortlist", type=int, default=8)  # --select-score shortlist: past chunks the mean keys keep for the best-key choice (finding 17)
p.add_argument("--select-loss", type=float, default=0.0)  # rwkvx: weight of the selection loss (finding 15)
p.add_argument("--probe-tokens", action="store_true")  # after training: how well each block's mixer input names its token (finding 16)
p.add_argument("--expand-init", choices=["zero", "copy"], default="zero")  # --base: the A blocks' init (copy: the package's expansion --init copy, the reference code's; finding 18)
p.add_argument("--attn-out-gain", type=float, default=1.0)  # rwkvx: the A blocks' attention output times this (finding 18)
p.add_argument("--rwkv-gate", default=None)  # rwkvx "S0,S1": the R blocks' residual outputs times 0 until step S0, rising linearly to 1 at S1 (finding 18)
p.add_argument("--rwkv-gate-blocks", default=None)  # --rwkv-gate: only these pattern positions (comma-separated; default every R block)
p.add_argument("--a-blocks-from", default=None)  # rwkvx: the A blocks' weights from this package .pth of the same pattern (finding 20)
p.add_argument("--init-model", default=None)  # rwkvx mqar: start from a package .pth of the byte tokenizer (finding 20)
p.add_argument("--probe", type=int, default=0)  # after training: induction weight of each sparse layer on this many eval documents
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
BYTES = None  # the model's ids of the toy's symbols, where they are not the symbols themselves
assert not a.init_model or (a.task == "mqar" and a.arch.startswith("rwkvx")), "--init-model reads the mqar task into an rwkvx model"
if a.task == "mqar":
    V, T = 256, 4 * a.pairs
    assert a.keys + a.values <= V and a.pairs <= a.keys, "keys + values must fit 256 ids, pairs <= keys"
    if a.init_model:
        # finding 20: the study's byte-level models read the toy's task written as their bytes:
        # keys are letters, values digits (the one-letter MQAR of finding 19 without its text)
        import string
        assert a.keys <= 52 and a.values <= 10, "--init-model writes keys as letters (<= 52), values as digits (<= 10)"
        V = 257
        BYTES = torch.tensor([ord(c) for c in (string.ascii_lowercase + string.ascii_uppercase)[: a.keys]]
                             + [ord(str(d)) for d in range(a.values)])
else:
    V = 64 if a.alphabet < 64 else 256  # one spare id: the filler symbol a.alphabet
    T = 2 * a.half + a.gap

class Block(nn.Module):
    def __init__(s, c, h):
        super().__init__(); s.h = h
        s.ln1, s.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        s.qkv = nn.Linear(c, 3 * c, bias=False); s.o = nn.Linear(c, c, bias=False)
        s.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        if SHIFT: s.mu = nn.Parameter(torch.full((3, c), 0.5))
    def forward(s, x):
        b, t, c = x.shape
        h = s.ln1(x)
        if SHIFT:  # RWKV's token shift on the attention's input: the previous token without a position
            prev = F.pad(h, (0, 0, 1, -1))
            h = torch.cat([h + s.mu[i] * (prev - h) for i in range(3)], -1)
            w = s.qkv.weight.view(3, c, c)
            q, k, v = torch.einsum("btjc,jdc->jbtd", h.view(b, t, 3, c), w).reshape(3, b, t, c // s.h, s.h).transpose(2, 3)
        else:
            q, k, v = s.qkv(h).view(b, t, 3, c // s.h, s.h).permute(2, 0, 3, 1, 4)
        if ROPE:
            q, k = rope(q), rope(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + s.o(y.transpose(1, 2).reshape(b, t, c))
        return x + s.mlp(s.ln2(x))

ROPE = a.arch == "gpt-rope"
SHIFT = a.arch == "gpt-shift"
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
    gate = [1.0]
    if a.rwkv_gate:
        # finding 18: the base's RWKV-7 blocks silenced at first (the package's --rwkv-fade-in: each
        # adds gate x its change to the stream), so the attention starts beside no RWKV-7 answer
        g0, g1 = (int(v) for v in a.rwkv_gate.split(","))
        gated_blocks = [int(v) for v in a.rwkv_gate_blocks.split(",")] if a.rwkv_gate_blocks else [i for i, sym in enumerate(pattern) if sym == "R"]
        assert "R" in pattern and 0 <= g0 <= g1 and all(pattern[i] == "R" for i in gated_blocks), \
            "--rwkv-gate S0,S1 gates R blocks of the pattern (--rwkv-gate-blocks: their positions)"
    def build(chunk=a.chunk, top_k=a.topk, mode="dense" if kind == "rwkvx-dense" else "sparse", pattern=pattern):
        cfg = RWKVXConfig(hidden_size=a.width, head_size=a.head, vocab_size=V, layer_pattern=pattern,
                          num_layers=len(pattern), sparse_chunk_size=chunk, sparse_top_k=top_k,
                          attention_mode=mode, sparse_token_shift=a.attn_shift,
                          use_cpu_initialization=True, params_dtype=torch.float32)
        m = RWKVXModel(cfg, parallel_output=False)
        if a.rwkv_gate:  # every copy (probe, ablation) reads at the gate training has reached
            for i in gated_blocks: m.decoder.layers[i].residual_gate = gate[0]
        if a.attn_out_gain != 1.0:
            # finding 18: a trained stack's residual stream is ~1000x a fresh one's (RMS 17 before the
            # final norm, 0.02 at init), so a zero-init block's output moves the logits that much less
            # per step; the gain scales the A blocks' output (under Adam: their output projection's lr)
            for layer in m.decoder.layers:
                if layer.symbol == "A":
                    layer.mixer.output.register_forward_hook(lambda mod, inp, out: (out[0] * a.attn_out_gain, *out[1:]))
        return m
    model = build()
    if a.init_model:
        if a.init_model.endswith(".pt"):  # a state dict of this model (finding 20's transplants)
            model.load_state_dict(torch.load(a.init_model))
        else:
            from megatron_rwkvx.pretrained import load_pretrained
            model.load_state_dict(load_pretrained(a.init_model, sparse_chunk_size=a.chunk, sparse_top_k=a.topk).state_dict())
    if a.qk_scale is not None:
        from megatron_rwkvx.layers.rwkv7_init import uniform_init
        # finding 16: the package drew query and key U(+-0.5/sqrt(C)) until then (RWKV-7's receptance
        # scale) and draws them at SPARSE_QK_INIT_SCALE = 1.0 since
        for layer in model.decoder.layers:
            if layer.symbol == "A":
                for proj in (layer.mixer.query, layer.mixer.key): uniform_init(a.qk_scale)(proj.weight)
    if a.shift_init == "rwkv":
        # finding 16: the sparse blocks' shift mixes start as an RWKV-7 first block's x_r, x_k, x_v
        # (per channel from fully the previous token to almost fully the current one) instead of 0.5 in
        # every channel, so some channels of a key already name the token before it
        assert a.attn_shift, "--shift-init rwkv sets the mixes of --attn-shift"
        from megatron_rwkvx.layers.rwkv7_init import time_mix_vectors
        start = time_mix_vectors(a.width, a.head, 0, pattern.count("R") or 1)
        for layer in model.decoder.layers:
            if layer.symbol == "A":
                for name in ("x_r", "x_k", "x_v"): getattr(layer.mixer, name).data.copy_(start[name])
    if a.select_score != "mean":
        # finding 15: another chunk score, patched into the one selection function every backend,
        # the probe and the ablation call (the package offers only the mean)
        import megatron_rwkvx.kernels.sparse_attention.selection as selection
        def scored_selection(q, k, *, chunk_size, top_k, q_offset=0):
            with torch.no_grad():
                b, tq, hq, d = q.shape; hkv = k.shape[2]
                n = (q_offset + tq - 1) // chunk_size
                kc = k[:, : n * chunk_size].float().reshape(b, n, chunk_size, hkv, d).repeat_interleave(hq // hkv, 3)
                past = (q_offset + torch.arange(tq)) // chunk_size  # each query's own chunk
                future = torch.arange(n)[None, :] >= past[:, None]  # [tq, n]: not yet complete for it
                if a.select_score in ("max", "shortlist"):  # the best single key of the chunk: exact, costs all of q.k
                    s = torch.einsum("bthd,bnchd->bhtnc", q.float(), kc).amax(-1)
                    if a.select_score == "shortlist":
                        # finding 17: the mean keys keep --shortlist past chunks, their best keys decide
                        # (--shortlist x chunk extra dot products per query, whatever the context length)
                        mean = torch.einsum("bthd,bnhd->bhtn", q.float(), kc.mean(2)).masked_fill(future, float("-inf"))
                        keep = mean.topk(min(a.shortlist, n), -1).indices
                        s = torch.full_like(s, float("-inf")).scatter(-1, keep, s.gather(-1, keep))
                else:  # Quest's bound: per channel the larger of q*max and q*min over the chunk's keys
                    qe = q.float().permute(0, 2, 1, 3)[:, :, :, None]  # [b, h, t, 1, d]
                    s = torch.maximum(qe * kc.amax(2).permute(0, 2, 1, 3)[:, :, None], qe * kc.amin(2).permute(0, 2, 1, 3)[:, :, None]).sum(-1)
                s = s.masked_fill(future, float("-inf"))
                out = torch.full((b, hq, tq, top_k - 1), -1, dtype=torch.long)
                out[..., : min(top_k - 1, n)] = selection.best_chunk_slots(s, past, top_k - 1)
            return None, out
        selection.topk_chunk_selection = scored_selection
    if a.select_loss:
        assert "A" in pattern, "--select-loss trains the sparse blocks' selection: the pattern has none"
        # finding 15: train each chunk's mean-key score towards the dense attention's mass on that
        # chunk (a KL over the query's complete past chunks, the target detached, NSA-style), so the
        # selection gets a gradient; MoBA's has none
        from megatron_rwkvx.layers.sparse_attention_block import SparseAttentionMixer
        captured = []
        plain_project = SparseAttentionMixer.project
        def capturing_project(self, x, previous_token=None):
            q, k, v = plain_project(self, x, previous_token)
            if self.training: captured.append((q.transpose(0, 1), k.transpose(0, 1)))
            return q, k, v
        SparseAttentionMixer.project = capturing_project
        def selection_loss():
            total, C, layers = 0.0, a.chunk, len(captured)
            for q, k in captured:  # [b, t, h, d]
                b, t, h, d = q.shape; n = t // C
                qh, kh = q.transpose(1, 2), k.transpose(1, 2)  # [b, h, t, d]
                past = torch.arange(t) // C
                keep = past >= 2  # a choice exists only among two or more past chunks
                allowed = torch.arange(n)[None, :] < past[:, None]  # [t, n]
                with torch.no_grad():
                    sc = (qh @ kh[:, :, : n * C].transpose(-1, -2)) * d ** -0.5  # [b, h, t, n*C]
                    target = sc.view(b, h, t, n, C).logsumexp(-1).masked_fill(~allowed, float("-inf"))
                    target = target[:, :, keep].softmax(-1)
                mean_k = kh[:, :, : n * C].reshape(b, h, n, C, d).mean(3)
                pred = ((qh @ mean_k.transpose(-1, -2)) * d ** -0.5).masked_fill(~allowed, float("-inf"))
                logp = pred[:, :, keep].log_softmax(-1)
                # the KL (cross-entropy less the target's entropy, which has no gradient)
                logt = target.clamp_min(1e-30).log()
                total = total + (target * (logt - logp).masked_fill(~allowed[keep], 0.0)).sum(-1).mean()
            captured.clear()
            return total / layers
if a.load:
    model.load_state_dict(torch.load(a.load))
if a.base:
    base, mine = torch.load(a.base), model.state_dict()
    r_layers = [i for i, sym in enumerate(pattern) if sym == "R"]
    def rename(k):
        if not k.startswith("decoder.layers."): return k
        j, rest = k[len("decoder.layers."):].split(".", 1)
        return f"decoder.layers.{r_layers[int(j)]}.{rest}"
    mapped = {rename(k): v for k, v in base.items()}
    assert set(mapped) <= set(mine) and len(base) == len(mapped), "the base's blocks do not fit this pattern"
    mine.update(mapped); model.load_state_dict(mine)
    if a.expand_init == "copy":
        # finding 18: the A blocks as the package's expansion makes them with --init copy (norms,
        # R/K/V/O and ChannelMix of the RWKV block before), through the real file layouts
        from megatron_rwkvx.checkpointing.expansion import expand_rwkv7_state_dict
        from megatron_rwkvx.checkpointing.official_format import OFFICIAL_RWKV7, REFERENCE_RWKVX, export_state_dict, import_state_dict
        rrrr = build(pattern="R" * len(r_layers)); rrrr.load_state_dict(base)
        official = export_state_dict(rrrr, rrrr.config, OFFICIAL_RWKV7)
        expanded, _ = expand_rwkv7_state_dict(official, pattern=pattern, init="copy", token_shift=a.attn_shift)
        import_state_dict(model, expanded, model.config, REFERENCE_RWKVX)
elif a.expand_init != "zero":
    raise SystemExit("--expand-init copy expands a --base")
if a.a_blocks_from:
    from megatron_rwkvx.pretrained import load_pretrained
    donor = load_pretrained(a.a_blocks_from, sparse_chunk_size=a.chunk, sparse_top_k=a.topk)
    for i, sym in enumerate(pattern):
        if sym == "A": model.decoder.layers[i].load_state_dict(donor.decoder.layers[i].state_dict())
if a.train_only == "sparse":
    from megatron_rwkvx.training.model_builder import freeze_for_stage1
    freeze_for_stage1([model])
elif a.train_only == "not-rwkv":
    assert a.arch.startswith("rwkvx"), "--train-only not-rwkv freezes the R blocks of an rwkvx pattern"
    for layer in model.decoder.layers:
        if layer.symbol == "R": layer.requires_grad_(False)
def set_gate(it):
    """--rwkv-gate: the gated R blocks at the package's --rwkv-fade-in schedule for step ``it``."""
    from megatron_rwkvx.training.rwkv_fade_in import gate_at
    gate[0] = gate_at(it, (g0, g1))
    for i in gated_blocks: model.decoder.layers[i].residual_gate = gate[0]
model.train()
nparam = sum(p.numel() for p in model.parameters())
trainable = [p for p in model.parameters() if p.requires_grad]
groups = [{"params": trainable}]
if a.rwkv_lr_scale != 1.0:
    assert a.arch.startswith("rwkvx") and "R" in pattern, "--rwkv-lr-scale scales the R blocks of an rwkvx pattern"
    slow = {id(p) for layer in model.decoder.layers if layer.symbol == "R" for p in layer.parameters() if p.requires_grad}
    groups = [{"params": [p for p in trainable if id(p) not in slow]},
              {"params": [p for p in trainable if id(p) in slow], "lr": a.lr * a.rwkv_lr_scale}]
opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
warm = 100
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1, (i + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, a.steps) / max(a.steps, 1)))))
g = torch.Generator().manual_seed(1000 + a.seed)
def mqar_batch(n, gen):
    """k1 v1 .. kN vN, then the same N pairs in a random order: the value after each asked key is
    scored, and only the key's content (not its offset, which the order makes random) leads to it."""
    N = a.pairs
    keys = torch.rand(n, a.keys, generator=gen).argsort(1)[:, :N]
    vals = a.keys + torch.randint(0, a.values, (n, N), generator=gen)
    order = torch.rand(n, N, generator=gen).argsort(1)
    ids = torch.empty(n, T, dtype=torch.long)
    ids[:, 0 : 2 * N : 2], ids[:, 1 : 2 * N : 2] = keys, vals
    ids[:, 2 * N :: 2], ids[:, 2 * N + 1 :: 2] = keys.gather(1, order), vals.gather(1, order)
    mask = torch.zeros(n, T - 1, dtype=torch.bool); mask[:, 2 * N :: 2] = True  # at the asked key, predict its value
    return (ids if BYTES is None else BYTES[ids]), mask
def batch(n, gen):
    """ids [n, T] and the mask of the targets scored: the second copy after its first symbol."""
    if a.task == "mqar": return mqar_batch(n, gen)
    s = torch.randint(0, a.alphabet, (n, a.half), generator=gen)
    if not a.gap:
        ids = torch.cat([s, s], 1)
        mask = torch.zeros(n, T - 1, dtype=torch.bool); mask[:, a.half:] = True
        return ids, mask
    gaps = torch.randint(0, a.gap + 1, (n,), generator=gen)
    ids = torch.full((n, T), a.alphabet); mask = torch.zeros(n, T - 1, dtype=torch.bool)
    for i, gi in enumerate(gaps.tolist()):
        ids[i, : a.half] = s[i]; ids[i, a.half + gi : 2 * a.half + gi] = s[i]
        mask[i, a.half + gi : 2 * a.half + gi - 1] = True  # target t+1 predicted at t
    return ids, mask
def score(ids, mask, logits):
    lg, tgt = logits[:, :-1][mask], ids[:, 1:][mask]
    return F.cross_entropy(lg, tgt).item(), (lg.argmax(-1) == tgt).float().mean().item()
evalg = torch.Generator().manual_seed(999)
evalids, evalmask = batch(64, evalg)
t0 = time.time(); log = []
for it in range(a.steps + 1):
    if it % 100 == 0 or it == a.steps:
        if a.rwkv_gate: set_gate(it)
        model.eval()
        with torch.no_grad(): l, acc = score(evalids, evalmask, model(evalids))
        model.train()
        log.append((it, l, acc)); print(f"{a.arch} {a.task} A={a.alphabet} gap={a.gap} pairs={a.pairs} loss={a.train_loss} it {it} loss2 {l:.3f} acc2 {acc:.3f} t {time.time()-t0:.0f}s", flush=True)
    if it == a.steps: break
    ids, mask = batch(a.batch, g)
    if a.rwkv_gate: set_gate(it)
    logits = model(ids)
    if a.train_loss == "scored": loss = F.cross_entropy(logits[:, :-1][mask], ids[:, 1:][mask])
    else: loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    if a.select_loss:
        aux = selection_loss(); loss = loss + a.select_loss * aux
        if it % 100 == 0: print(f"it {it} selection KL {aux.item():.3f}", flush=True)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
def probe(n):
    """Per sparse layer, over the second copies of n eval documents: the weight put on the source of
    the token to write next (the induction weight), and that weight if each head spread its weight
    evenly over the keys it reads (copy_probe's measure, with the layer's own selection)."""
    import types
    from megatron_rwkvx.evaluation.retrieval import SelectionRecorder
    from megatron_rwkvx.evaluation.copy_probe import induction_weight
    iw, ev, spread = [], [], {}
    for r in range(n):
        ids = evalids[r : r + 1]
        with SelectionRecorder(types.SimpleNamespace(model=model)) as rec, torch.no_grad():
            model(ids); recd = rec.take(ids.shape[1])
        start = int(evalmask[r].nonzero()[0])  # second copy's first symbol
        lines = [(0, start, a.half)]
        iw.append(induction_weight(rec, recd, lines)); ev.append(induction_weight(rec, recd, lines, even=True))
        for i in range(a.half - 1):  # where each head's weight goes instead
            for layer, heads in enumerate(rec.attention_weights(recd, start + i)):
                for h, (keys, w) in enumerate(heads):
                    row = spread.setdefault((layer, h), [0.0] * 4)
                    row[0] += float(-(w * w.clamp_min(1e-30).log()).sum()); row[1] += math.log(len(keys))
                    row[2] += float(w[keys < a.half].sum()); row[3] += abs(int(keys[w.argmax()]) - (i + 1))
    queries = (a.half - 1) * n
    for (layer, h), row in sorted(spread.items()):
        print(f"sparse layer {layer} head {h}: entropy {row[0]/queries:.2f} (even {row[1]/queries:.2f}), weight on "
              f"the first copy {row[2]/queries:.2f}, |argmax key - source| {row[3]/queries:.1f}", flush=True)
    mean = lambda rows: [round(sum(c) / len(c), 4) for c in zip(*rows)]
    return mean(iw), mean(ev)
def mqar_probe(n, model=model):
    """Per sparse layer, over every asked key of n eval documents: how often a head's selected chunks
    hold the asked pair (the hit rate, with the rate of a random selection beside it), the largest
    share over heads of the weight on the pair's two positions (with the even level), and the share of
    the selected past chunks that lie in the pair list (with a random selection's)."""
    import types
    from megatron_rwkvx.evaluation.retrieval import SelectionRecorder
    N, listed = a.pairs, 2 * a.pairs // a.chunk  # chunks 0..listed-1 hold the pair list
    per_layer = dict(hit=[], mass=[], even_mass=[], in_pair_list=[])  # one row of layer values per query
    per_query = dict(random_hit=[], hit_any_layer=[], random_hit_any_layer=[], random_in_pair_list=[])
    for r in range(n):
        ids = evalids[r : r + 1]
        with SelectionRecorder(types.SimpleNamespace(model=model)) as rec, torch.no_grad():
            model(ids); recd = rec.take(ids.shape[1])
        where = {int(ids[0, 2 * j]): 2 * j for j in range(N)}
        for t in range(2 * N, T, 2):
            pair, own = [where[int(ids[0, t])], where[int(ids[0, t])] + 1], t // a.chunk
            attended = rec.attended_chunks(recd, t)
            hit, chance = rec.hits(recd, t, pair, attended), rec.chance(t, pair)  # chance: some head of any layer
            per_layer["hit"].append(hit)
            per_layer["mass"].append(rec.attention_mass(recd, t, pair))
            per_layer["even_mass"].append(rec.attention_mass(recd, t, pair, even=True))
            per_layer["in_pair_list"].append([sum(c < listed for c in s - {own}) / max(len(s - {own}), 1) for s in attended])
            per_query["random_hit"].append(1 - (1 - chance) ** (1 / len(hit)))
            per_query["hit_any_layer"].append(float(any(hit)))
            per_query["random_hit_any_layer"].append(chance)
            per_query["random_in_pair_list"].append(listed / own)  # any random subset of the own-1 past chunks
    out = {k: [sum(c) / len(c) for c in zip(*rows)] for k, rows in per_layer.items()}
    out.update({k: sum(v) / len(v) for k, v in per_query.items()})
    for i in range(len(out["hit"])):
        print(f"sparse layer {i}: hit rate on the asked pair {out['hit'][i]:.3f} (random selection {out['random_hit']:.3f}), "
              f"weight on the pair {out['mass'][i]:.3f} (even {out['even_mass'][i]:.3f}), "
              f"selected chunks in the pair list {out['in_pair_list'][i]:.3f} (random {out['random_in_pair_list']:.3f})", flush=True)
    print(f"hit rate in some sparse layer {out['hit_any_layer']:.3f} (random {out['random_hit_any_layer']:.3f})", flush=True)
    return out
probed = None
if a.probe and a.task == "mqar" and a.arch.startswith("rwkvx") and "A" in pattern:
    # a dense-trained model is probed as it reads with --chunk/--topk (the same weights, sparse)
    read = model
    if kind == "rwkvx-dense":
        read = build(mode="sparse"); read.load_state_dict(model.state_dict())
    model.eval(); read.eval(); probed = mqar_probe(a.probe, read)
if a.probe and a.task == "copy" and not a.arch.startswith(("gpt", "rwkvx-dense")):
    model.eval(); probed = probe(a.probe)
    print(f"induction weight per sparse layer {probed[0]} (even level {probed[1]})", flush=True)
ablated = None
if a.ablate and a.arch.startswith("rwkvx"):
    # top-k 1: each query reads its own chunk only, so nothing of the first copy beyond it
    ablated = {}
    readings = [("own chunk only (top-k 1)", a.chunk, 1, False), ("chunk 16, top-k 1", 16, 1, False),
                ("chunk 16, top-k 3", 16, 3, False), ("sparse output zeroed", a.chunk, a.topk, True)]
    if kind == "rwkvx-dense":  # the dense-trained weights read sparsely (no retraining), and silenced
        readings = [(f"read sparse, chunk {c}, top-k {k}", c, k, False) for c, k in
                    [(16, 1), (16, 3), (8, 6), (4, 12), (16, T // 16)]] + [("attention output zeroed", a.chunk, a.topk, True)]
    for name, chunk, top_k, silenced in readings:
        other = build(chunk, top_k, mode="sparse"); other.load_state_dict(model.state_dict()); other.eval()
        if silenced:
            for layer in other.decoder.layers:
                if layer.symbol == "A": layer.mixer.output.weight.data.zero_()
        with torch.no_grad(): ablated[name] = score(evalids, evalmask, other(evalids))
        print(f"ablation {name}: loss2 {ablated[name][0]:.3f} acc2 {ablated[name][1]:.3f}", flush=True)
token_probe = None
if a.probe_tokens and a.arch.startswith("rwkvx"):
    # finding 16: a content lookup needs each position's own token in what the attention reads. Per
    # block, a linear softmax classifier is fitted from the mixer's (normed) input to the position's
    # token id on 48 documents and scored on 16 others (the eval documents; at T=256, 12K / 4K rows)
    feats = {}
    hooks = [layer.mixer.register_forward_pre_hook(lambda mod, args, i=i: feats.__setitem__(i, args[0].detach()))
             for i, layer in enumerate(model.decoder.layers)]
    model.eval()
    with torch.no_grad(): model(evalids)
    for h in hooks: h.remove()
    token_probe = []
    for i, layer in enumerate(model.decoder.layers):
        x = feats[i].transpose(0, 1)  # [b, t, c]
        xtr, xte = x[:48].reshape(-1, x.shape[-1]), x[48:].reshape(-1, x.shape[-1])
        ytr, yte = evalids[:48].reshape(-1), evalids[48:].reshape(-1)
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
        torch.manual_seed(0)
        clf = nn.Linear(x.shape[-1], V); o = torch.optim.Adam(clf.parameters(), lr=1e-2)
        for _ in range(500):
            o.zero_grad(); F.cross_entropy(clf((xtr - mu) / sd), ytr).backward(); o.step()
        with torch.no_grad(): acc = (clf((xte - mu) / sd).argmax(-1) == yte).float().mean().item()
        # the share of the input's variance that the token alone explains (1: the input is a function of the token)
        flat, ids = x.reshape(-1, x.shape[-1]), evalids.reshape(-1)
        means = torch.zeros(V, flat.shape[-1]).index_add_(0, ids, flat) / torch.bincount(ids, minlength=V).clamp_min(1)[:, None]
        explained = 1 - ((flat - means[ids]) ** 2).sum().item() / ((flat - flat.mean(0)) ** 2).sum().item()
        token_probe.append((acc, explained))
        print(f"block {i} ({layer.symbol}): its token read linearly from the mixer input, held out: {acc:.3f}; "
              f"variance explained by the token: {explained:.3f}", flush=True)
if a.save: torch.save(model.state_dict(), a.save)
res = dict(vars(a), params=nparam, log=log, ablation=ablated, wall=time.time() - t0,
           token_probe=token_probe, **{"mqar_probe" if a.task == "mqar" else "induction": probed})
if a.out: json.dump(res, open(a.out, "w"))
