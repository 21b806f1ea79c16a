#!/usr/bin/env python
"""Benchmark: RWKV World tokenizer vs the reference trie, and preprocess_data at 1 vs 2 workers.

Everything is measured in this run on a corpus made here (standard-library documentation and
source, CJK, emoji), so the ratios compare like with like:

  python tools/bench_preprocess.py            # ~4 MB of text
  python tools/bench_preprocess.py --mb 16 --workers 1 2 4
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time

import megatron_rwkvx  # noqa: F401  (first: it silences megatron-core's import-time notices)


def make_documents(target_bytes: int) -> list:
    from megatron_rwkvx.data.sample_corpus import stdlib_documents

    base = list(stdlib_documents())
    import json as _json, textwrap, argparse as _argparse  # noqa: E401 - sources used as code documents

    base += [inspect.getsource(m) for m in (_json.decoder, textwrap, _argparse)]
    base += ["中文分词测试：人工智能正在改变世界。日本語のテキストです。한국어 문장입니다。" * 30,
             "emoji 😀🎉👩‍👩‍👧‍👦 mixed with text ✨🚀 " * 50]
    docs, size, i = [], 0, 0
    while size < target_bytes:
        d = base[i % len(base)]
        docs.append(d)
        size += len(d.encode("utf-8"))
        i += 1
    return docs


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=4.0, help="corpus size in MB of UTF-8 text")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts for the whole tool")
    p.add_argument("--repeats", type=int, default=3, help="best of this many timings (tokenizer only)")
    args = p.parse_args(argv)

    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    import megatron.core.datasets.indexed_dataset  # noqa: F401 - import once, outside the timings

    from megatron_rwkvx.data import rwkv_trie
    from megatron_rwkvx.data.preprocess import PreprocessConfig, run_preprocess
    from megatron_rwkvx.data.tokenizers import RWKVWorldTokenizer

    docs = make_documents(int(args.mb * 1e6))
    data = [d.encode("utf-8") for d in docs]
    nbytes = sum(map(len, data))
    ours = RWKVWorldTokenizer()
    ref = TRIE_TOKENIZER(rwkv_trie.world_vocab_path())
    trie = rwkv_trie.load_flat_trie(ours.vocab_file)

    ntok = sum(len(ours.tokenize_bytes(d)) for d in data)
    t_ref = best_of(lambda: [ref.encodeBytes(d) for d in data], 1)
    t_c = best_of(lambda: [trie.encode(d, use_c=True) for d in data], args.repeats) if rwkv_trie.c_extension_available() else None
    t_py = best_of(lambda: [trie.encode(d, use_c=False) for d in data], 1)
    print(f"corpus: {len(docs)} documents, {nbytes / 1e6:.1f} MB, {ntok:,} RWKV World tokens")
    print(f"{'tokenizer':<34}{'tokens/s':>14}{'MB/s':>9}{'vs reference':>14}")
    rows = [("reference rwkv TRIE_TOKENIZER", t_ref), ("ours, C trie walk", t_c), ("ours, pure-Python fallback", t_py)]
    for name, t in rows:
        if t is None:
            print(f"{name:<34}{'(C extension not built)':>37}")
            continue
        print(f"{name:<34}{ntok / t:>14,.0f}{nbytes / t / 1e6:>9.1f}{t_ref / t:>13.1f}x")

    with tempfile.TemporaryDirectory() as tmp:
        inp = os.path.join(tmp, "corpus.jsonl")
        with open(inp, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        print(f"\n{'preprocess_data (whole tool)':<34}{'tokens/s':>14}{'MB/s':>9}{'vs first':>14}")
        best = {}
        for rep in range(args.repeats):  # interleaved, best of --repeats: load spikes hit all counts alike
            for w in args.workers:
                prefix = os.path.join(tmp, f"w{w}-{rep}")
                cfg = PreprocessConfig(input=inp, output_prefix=prefix, workers=w, append_eod=True, log_interval=0)
                t = time.perf_counter()
                stats = run_preprocess(cfg, log=lambda m: None)
                t = time.perf_counter() - t
                best[w] = min(best.get(w, t), t)
                for ext in (".bin", ".idx"):
                    os.remove(cfg.output_prefix_for("text") + ext)
        base = best[args.workers[0]]
        for w in args.workers:
            t = best[w]
            print(f"{f'--workers {w}':<34}{stats.tokens['text'] / t:>14,.0f}{nbytes / t / 1e6:>9.1f}{base / t:>13.2f}x")
    print(f"\nmachine: {os.cpu_count()} CPU cores; C extension: {rwkv_trie.c_extension_available()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
