#!/usr/bin/env python
"""The retrieval study: RWKV-X retrieves where the RWKV-7 it was expanded from cannot (one command).

  python tools/retrieval_study.py --output study            # the full study (docs/retrieval_study.md)
  python tools/retrieval_study.py --output study --quick    # the same recipe, less training, fewer lengths
  python tools/retrieval_study.py --output study --size test  # seconds-long plumbing check (tests)
  ... --sparse-token-shift --stage1-dense  # the variants of finding 14 (not the reference recipe)
  ... --stage1-rwkv-fade-in  # finding 18's variant: stage 1 with the base's RWKV-7 blocks silenced first
  ... --sparse-selection quest  # chunks selected by Quest's bound from stage 1 on (finding 22)
  ... --recipe curriculum  # findings 20-24's recipe instead of the paper's (below)
  ... --seed N  # every training step's seed

The paper's recipe at tiny scale, every step through the real entry points:
  1. synthetic documents (passkey + MQAR, megatron_rwkvx.data.retrieval_tasks, training seeds
     >= 1,000,000) at the stage-1 and the stage-2 context -> tools/preprocess_data.py (ByteTokenizer)
  2. an RWKV-7 base trained from scratch at the stage-1 context (python -m megatron_rwkvx.pretrain)
  3. tools/export_checkpoint.py, tools/convert_rwkv7_to_rwkvx.py (zero-init sparse blocks)
  4. stage 1: only the sparse blocks train, stage-1 context
  5. stage 2: everything trains, stage-2 context, 2 processes with --context-parallel-size 2
  6. the control: the RWKV-7 base trained on the same stage-2 data for the same tokens, same launcher
  7. tools/eval_passkey.py --hit-rate and tools/eval_mqar.py on both models (evaluation seeds 0..),
     from the stage-1 context to 8x the stage-2 context
  8. retrieval_study.png (passkey heatmaps side by side, MQAR accuracy by length), retrieval_study.md
     (tables, the command, the machine, wall times) and retrieval_study.json in --output

--recipe curriculum replaces steps 4-6 (``CurriculumSize``; not the paper's recipe): one-letter MQAR
corpora with their answers marked (preprocess_data --loss-spans-key, pretrain --loss-on-spans), the
expansion with token-shift mixes, and RWKV-X trained on the compact layout and the no-filler layout
with its RWKV-7 blocks silenced (--train-only sparse --rwkv-fade-in), then faded in, then every weight
on the layout with filler (CP 2), chunks selected by Quest's bound, and last at 2048 tokens (CP 2, where
the selection chooses) on half passkey documents (their answers marked) and half the filler layout; the
control is the RWKV-7 base on the same corpora for the same iterations. The two lines train side by side
(one thread each). MQAR is evaluated with the same one-letter keys (tools/eval_mqar.py --key-letters 1),
passkey as in the paper recipe.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

from megatron_rwkvx.kernels.sparse_attention.selection import MEAN_SELECTION, SELECTION_RULES
from megatron_rwkvx.testing.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")


@dataclass
class StudySize:
    """Everything the study's size sets. Stage lengths: stage 2 is ``stage2_seq`` (CP 2), evaluation
    goes to 8x it."""

    width: int = 64
    head_size: int = 32
    chunk: int = 64
    top_k: int = 3
    base_seq: int = 512
    stage1_seq: int = 1024  # the paper's stage-1 context
    stage2_seq: int = 2048
    num_pairs: int = 80  # MQAR: more than the 64 keys a layer's RWKV-7 state can recall (see docs)
    num_queries: int = 32
    # Document kinds in turn (retrieval_tasks.training_documents). The base's corpus is half copy
    # documents: it stands in for a pretraining corpus, and a base that has never had to copy does not
    # learn to (docs/retrieval_study.md); the later stages keep some so the skill is not forgotten.
    base_mix: Tuple[str, ...] = ("copy", "passkey", "copy", "mqar")
    stage_mix: Tuple[str, ...] = ("passkey", "mqar", "copy")
    copy_chars: Tuple[int, int] = (5, 40)
    # Each training document's own length is drawn from [min_doc_fraction x context, context] (then
    # padded): with every document as long as the context, the question always sits near the end of
    # the window and a model can learn that position instead of reading (docs/retrieval_study.md).
    min_doc_fraction: float = 0.25
    base_docs: int = 12000  # one pass: base_iters x batch1
    stage1_docs: int = 4800
    stage2_docs: int = 1200
    batch1: int = 8
    batch2: int = 4
    # A tiny base learns to copy after ~600-1000 iterations (a sudden drop of the copy documents' loss)
    base_iters: int = 1500
    base_lr: float = 4e-3
    # Stage 1 reads every chunk (top-k = the number of chunks: exact dense causal attention), as the
    # paper's does (context 1024 < chunk 2048 x top-k 3); stage 2 and the evaluation select top_k.
    stage1_dense: bool = False
    # The expansion gives the sparse blocks token-shift mixes (not in the reference RWKV-X;
    # docs/retrieval_study.md, finding 13); the stages inherit them from the checkpoint.
    sparse_token_shift: bool = False
    # Stage 1 with --rwkv-fade-in: the base's RWKV-7 blocks silenced for its first half and faded
    # back in over the third quarter (not the reference recipe; docs/retrieval_study.md, finding 18)
    stage1_rwkv_fade_in: bool = False
    # How the sparse blocks select chunks from stage 1 on (stage 2 and the export inherit it):
    # "mean" (the reference) or "quest" (Quest's bound; docs/retrieval_study.md, findings 21-22).
    sparse_selection: str = MEAN_SELECTION
    stage1_iters: int = 600
    stage1_lr: float = 2e-3
    stage2_iters: int = 300
    stage2_lr: float = 1e-3
    eval_lengths: List[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384])
    passkey_depths: int = 5
    passkey_seeds: int = 2
    mqar_seeds: int = 3
    eval_iters: int = 2  # validation batches at the end of each training step (loss in the logs)


SIZES: Dict[str, StudySize] = {
    "full": StudySize(),
    "quick": StudySize(base_docs=8000, stage1_docs=800, stage2_docs=160, base_iters=1000, stage1_iters=100, stage2_iters=40,
                       eval_lengths=[512, 2048, 8192], passkey_depths=3, passkey_seeds=1, mqar_seeds=2),
    # Plumbing only: every entry point runs, nothing is expected to be learned.
    # (the reference passkey prompt needs ~250 bytes, hence no shorter context)
    "test": StudySize(width=32, head_size=16, chunk=32, top_k=2, base_seq=256, stage1_seq=256, stage2_seq=512, num_pairs=6,
                      num_queries=2, base_docs=24, stage1_docs=8, stage2_docs=8, batch1=2, batch2=2, base_iters=2,
                      stage1_iters=1, stage2_iters=1, eval_lengths=[256, 512], passkey_depths=2,
                      passkey_seeds=1, mqar_seeds=1, eval_iters=0),
}


CORPUS_SEEDS = 1_000_000  # seeds per training corpus (more than any corpus has documents)


@dataclass
class CurriculumSize:
    """``--recipe curriculum`` (docs/retrieval_study.md, findings 20-22; not the paper's recipe): one-letter
    MQAR with ``keys`` pairs (52: more than the control's state holds), the loss on the answers only, in
    three layouts, each as long as one training window of ``seq`` tokens (one document a window).
    RWKV-X: the compact layout with its RWKV-7 blocks silenced (only the sparse blocks train), the
    study's layout without filler, still silenced, then with the RWKV-7 blocks faded back in, then
    every weight on the layout with filler (context parallelism over 2 processes). The control: the
    RWKV-7 base on the same corpora, for the same iterations, with the same schedules."""

    keys: int = 52
    compact_seq: int = 256
    seq: int = 512
    top_k: int = 8  # 8 chunks of 64: at 512 tokens every chunk is read, beyond it the selection chooses
    compact_iters: int = 1500
    compact_lr: float = 3e-3  # cosine to a tenth
    silenced_iters: int = 600
    fade_iters: int = 600  # the RWKV-7 blocks ramp from silent to full over its first two thirds
    filler_iters: int = 600
    lr: float = 2e-3  # constant, after 20 warm-up iterations
    batch: int = 16
    # Last, both models train at ``long_seq`` (CP 2) on half passkey documents (the answer `` 12345.``
    # marked; neither model kept the passkey through the MQAR stages, finding 23) and half the filler
    # layout: at 2048 tokens the selection chooses 8 of 32 chunks, where at 512 it reads all 8, and
    # trained only where it reads everything, Quest's bound lost the value's chunk for some keys (finding 24)
    long_seq: int = 2048
    long_batch: int = 4  # as many tokens an iteration as the stages before
    long_iters: int = 600
    mqar_seeds: int = 20  # evaluation documents per length, each asking every key
    passkey_seeds: int = 8  # evaluation prompts per length and depth


CURRICULA: Dict[str, CurriculumSize] = {
    "full": CurriculumSize(),
    "quick": CurriculumSize(compact_iters=600, silenced_iters=200, fade_iters=200, filler_iters=200, long_iters=200,
                            mqar_seeds=4, passkey_seeds=2),
    "test": CurriculumSize(keys=6, compact_seq=64, seq=256, top_k=2, compact_iters=1, silenced_iters=1, fade_iters=1,
                           filler_iters=1, long_seq=512, long_batch=2, long_iters=1, batch=2, mqar_seeds=1,
                           passkey_seeds=1),
}
RECIPES = ("paper", "curriculum")


def write_corpus(path: str, num_docs: int, seq: int, size: StudySize, mix: Tuple[str, ...], part: int) -> None:
    """``part``: which training corpus (0 base, 1 stage 1, ...): its seeds follow the previous parts',
    so no document is seen in two stages (and none is an evaluation document)."""
    from megatron_rwkvx.data.retrieval_tasks import TRAIN_SEED_BASE, training_documents
    from megatron_rwkvx.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    count = lambda s: len(tok.tokenize(s))  # noqa: E731
    # seq - 1 tokens + the end of document = one training window: every window starts a document.
    docs = training_documents(num_docs, seq - 1, size.num_pairs, size.num_queries, count, mix=mix,
                              copy_chars=size.copy_chars, seed_base=TRAIN_SEED_BASE + part * CORPUS_SEEDS,
                              min_length=int(size.min_doc_fraction * (seq - 1)) if size.min_doc_fraction else None)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


def write_curriculum_corpora(folder: str, c: CurriculumSize) -> Dict[str, str]:
    """The curriculum's five corpora as jsonl with ``answers`` spans (every asked value, or the passkey's
    `` 12345.``); returns ``{layout: path}``. Seeds follow the paper recipe's corpora (parts 3-7), so none
    is an evaluation document and none is in another corpus."""
    from megatron_rwkvx.data.retrieval_tasks import (TRAIN_SEED_BASE, mqar_compact_document, mqar_document,
                                                     padded, passkey_training_document)

    count = lambda text: len(text.encode("utf-8"))  # noqa: E731  (the byte tokenizer)
    # one document per training window (the end-of-document token fills it); the longest stage of each
    # corpus reads it once (the RWKV-X stages on the no-filler layout read the same first documents twice,
    # the control's one stage as many as both; the long stage reads half of each of its two)
    needs = {"compact": (c.compact_seq, c.compact_iters, c.batch),
             "no-filler": (c.seq, c.silenced_iters + c.fade_iters, c.batch),
             "filler": (c.seq, c.filler_iters, c.batch),
             "long-passkey": (c.long_seq, -(-c.long_iters // 2), c.long_batch),
             "long-filler": (c.long_seq, -(-c.long_iters // 2), c.long_batch)}
    paths = {}
    for part, (layout, (seq, iters, batch)) in enumerate(needs.items(), start=3):
        num_docs = -(-iters * batch * 100 // 98) + 4 * batch  # the 98% train split, validation batches
        path = os.path.join(folder, f"{layout}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for i in range(num_docs):
                seed = TRAIN_SEED_BASE + part * CORPUS_SEEDS + i
                if layout == "long-passkey":  # the evaluation's prompt (a needle at a random depth) and its answer
                    doc = passkey_training_document(seq - 1, seed, count)
                elif layout == "compact":
                    doc = mqar_compact_document(c.keys, seed)
                else:
                    doc = mqar_document(seq - 1, c.keys, c.keys, seed, count, key_letters=1, filler=layout != "no-filler")
                f.write(json.dumps({"text": padded(doc["text"], seq - 1, count), "answers": doc["answer_spans"]}) + "\n")
        paths[layout] = path
    return paths


class Runner:
    """Runs each step as a subprocess, logs it to ``<output>/logs``, and times it. ``parallel`` runs
    chains of steps side by side; the first step that fails stops the others."""

    def __init__(self, output: str, port: Optional[int]):
        self.output, self.port = output, port
        self.logs = os.path.join(output, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.times: Dict[str, float] = {}
        self._lock = threading.Lock()
        self._live: set = set()
        self._ports: set = set()  # the rendezvous ports of the steps running now
        self.failure: Optional[str] = None  # the first failed step's message

    def __call__(self, name: str, argv: List[str], threads: int = 2) -> None:
        """``threads``: torch threads per process (2 cores: 2 for one process, 1 each for two)."""
        print(f"=== {name}: {' '.join(shlex.quote(a) for a in argv)}", flush=True)
        start = time.time()
        log = os.path.join(self.logs, f"{name}.log")
        with self._lock:
            if self.failure:  # a step beside this one failed: start nothing more
                raise SystemExit(self.failure)
            # A free port per step: a fixed one (29500, torch's default) may be taken by another job. A
            # --master-port is used as given, or the next one up while a step beside holds it.
            port = self.port
            while port in self._ports:
                port += 1
            port = port or free_port()
            self._ports.add(port)
            argv = [str(port) if a == "{port}" else a for a in argv]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            with open(log, "w") as f:
                proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
            self._live.add(proc)
        code = proc.wait()
        with self._lock:
            self._live.discard(proc)
            self._ports.discard(port)
        self.times[name] = time.time() - start
        if code != 0:
            self.stop(self._failure(name, code, log))
            raise SystemExit(self.failure)
        print(f"    {self.times[name]:.0f} s", flush=True)

    def stop(self, failure: str) -> None:
        """Records the first failure and terminates the steps running beside it."""
        with self._lock:
            self.failure = self.failure or failure
            for proc in self._live:
                proc.terminate()

    def parallel(self, *chains: Callable[[], None]) -> None:
        """Runs each chain (a function that calls steps in turn) in its own thread, at once: two one-thread
        training processes on 2 cores train faster together than one two-thread process after the other."""
        def guarded(chain):
            try:
                chain()
            except BaseException as e:  # noqa: B036  (SystemExit too: stop the other chains)
                self.stop(f"error: {e!r}" if not isinstance(e, SystemExit) else str(e))
                raise

        with ThreadPoolExecutor(len(chains)) as pool:
            futures = [pool.submit(guarded, chain) for chain in chains]
        if any(f.exception() is not None for f in futures):
            raise SystemExit(self.failure)

    def tool(self, name: str, script: str, argv: List[str]) -> None:
        """``tools/<script>``'s ``main(argv)`` in this process (the same code as its command line,
        without another interpreter start and megatron-core import: ~5-20 s each on a busy CPU)."""
        print(f"=== {name}: tools/{script} {' '.join(shlex.quote(a) for a in argv)}", flush=True)
        start = time.time()
        log = os.path.join(self.logs, f"{name}.log")
        spec = importlib.util.spec_from_file_location(f"_study_{script[:-3]}", os.path.join(TOOLS, script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            try:
                code = module.main(argv)
            except SystemExit as e:  # argparse errors
                code = e.code
        self.times[name] = time.time() - start
        if code:
            raise SystemExit(self._failure(name, code, log))
        print(f"    {self.times[name]:.0f} s", flush=True)

    @staticmethod
    def _failure(name: str, code, log: str) -> str:
        with open(log) as f:
            tail = f.read()[-3000:]
        return f"{tail}\nerror: step {name!r} failed (exit {code}); full log: {log}"


def run_study(output: str, size_name: str, port: Optional[int] = None, recipe: str = "paper", seed: Optional[int] = None,
              **variant) -> Dict:
    """``variant``: ``StudySize`` fields that replace the size's (``stage1_dense``, ``sparse_token_shift``,
    ``stage1_rwkv_fade_in``, ``sparse_selection``). ``recipe``: ``paper`` (stage 1 and stage 2) or
    ``curriculum`` (``CurriculumSize``; it implies ``sparse_token_shift`` and Quest's selection). ``seed``:
    every training step's ``--seed`` (initialisation and data order; default: pretrain's); the corpora
    and the evaluation documents do not depend on it."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if recipe == "curriculum":
        variant = {**variant, "sparse_token_shift": True, "sparse_selection": "quest"}
    size = replace(SIZES[size_name], **variant)
    s = size
    run = Runner(output, port)
    path = lambda *p: os.path.join(output, *p)  # noqa: E731
    started = time.time()

    # 1. data
    t0 = time.time()
    write_corpus(path("corpus", "base.jsonl"), s.base_docs, s.base_seq, s, s.base_mix, 0)
    corpora, answer_marked = ["base"], []  # the curriculum's corpora carry their answers' spans
    if recipe == "paper":
        write_corpus(path("corpus", "stage1.jsonl"), s.stage1_docs, s.stage1_seq, s, s.stage_mix, 1)
        write_corpus(path("corpus", "stage2.jsonl"), s.stage2_docs, s.stage2_seq, s, s.stage_mix, 2)
        corpora += ["stage1", "stage2"]
    else:
        answer_marked = list(write_curriculum_corpora(path("corpus"), CURRICULA[size_name]))
        corpora += answer_marked
    run.times["corpus"] = time.time() - t0
    for name in corpora:
        run.tool(f"preprocess_{name}", "preprocess_data.py", [
            "--input", path("corpus", f"{name}.jsonl"), "--output-prefix", path("data", name),
            "--tokenizer-type", "ByteTokenizer", "--append-eod", "--overwrite",
            *(["--loss-spans-key", "answers"] if name in answer_marked else [])])
    data = {name: path("data", f"{name}_text_document") for name in corpora}

    pretrain = [sys.executable, "-m", "megatron_rwkvx.pretrain"]
    pretrain_cp2 = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", "{port}", "-m", "megatron_rwkvx.pretrain", "--context-parallel-size", "2"]
    top_k = s.top_k if recipe == "paper" else CURRICULA[size_name].top_k  # training and evaluation
    common = ["--device", "cpu", "--tokenizer-type", "ByteTokenizer", "--split", "98,2,0", "--eval-iters", str(s.eval_iters),
              "--log-interval", "5", "--sparse-chunk-size", str(s.chunk), "--sparse-top-k", str(top_k),
              *(["--seed", str(seed)] if seed is not None else [])]
    ck = lambda name: path("checkpoints", name)  # noqa: E731
    for name in ("rwkv7", "stage1", "stage2", "control", *CURRICULUM_CHECKPOINTS):
        shutil.rmtree(ck(name), ignore_errors=True)
    os.makedirs(path("models"), exist_ok=True)

    # 2. the RWKV-7 base
    run("base_rwkv7", pretrain + common + [
        "--hidden-size", str(s.width), "--head-size", str(s.head_size), "--layer-pattern", "RRRR",
        "--data-path", data["base"], "--seq-length", str(s.base_seq), "--micro-batch-size", str(s.batch1),
        "--global-batch-size", str(s.batch1), "--train-iters", str(s.base_iters), "--lr", str(s.base_lr),
        "--min-lr", str(s.base_lr / 10), "--lr-decay-style", "cosine", "--lr-warmup-iters", str(s.base_iters // 20),
        "--eval-interval", str(s.base_iters), "--save", ck("rwkv7")])
    run.tool("export_base", "export_checkpoint.py", ["--load", ck("rwkv7"), "--output", path("models", "rwkv7-base.pth"),
                                                       "--dtype", "fp32", "--overwrite"])
    # 3. expansion (zero-init: the expanded model computes exactly the base)
    shutil.rmtree(ck("rwkvx-expanded"), ignore_errors=True)
    run.tool("expand", "convert_rwkv7_to_rwkvx.py", ["--input", path("models", "rwkv7-base.pth"), "--output",
                                                      ck("rwkvx-expanded"), "--num-sparse-blocks", "2",
                                                      "--output-format", "megatron"]
             + (["--sparse-token-shift"] if s.sparse_token_shift else []))
    # 7. evaluation (after each model's training): exact incremental decoding, evaluation seeds 0..
    lengths = ",".join(str(n) for n in s.eval_lengths)
    model_args = ["--tokenizer-type", "ByteTokenizer", "--set", f"sparse_chunk_size={s.chunk}", "--set", f"sparse_top_k={top_k}"]
    if recipe == "paper":
        mqar_args = ["--num-pairs", str(s.num_pairs), "--num-queries", str(s.num_queries), "--seeds", str(s.mqar_seeds)]
        passkey_seeds = s.passkey_seeds
    else:
        c = CURRICULA[size_name]
        mqar_args = ["--key-letters", "1", "--num-pairs", str(c.keys), "--num-queries", str(c.keys), "--seeds", str(c.mqar_seeds)]
        passkey_seeds = c.passkey_seeds
    evaluations = {"passkey": [*model_args, "--lengths", lengths, "--depths", str(s.passkey_depths), "--seeds",
                               str(passkey_seeds), "--hit-rate", "--read-weight"],
                   "mqar": [*model_args, "--lengths", lengths, *mqar_args]}

    def finish(label: str, checkpoint: str, model: str, in_process: bool) -> None:
        """Exports a trained model and evaluates it: the tools in this process, or (beside another chain)
        each as its own one-thread process."""
        slug = label.lower().replace("-", "")
        steps = [("export_rwkvx" if label == "RWKV-X" else "export_control", "export_checkpoint.py",
                  ["--load", checkpoint, "--output", model, "--dtype", "fp32", "--overwrite"])]
        steps += [(f"{task}_{slug}", f"eval_{task}.py", ["--model", model, *argv, "--output-dir", path("eval", slug, task)])
                  for task, argv in evaluations.items()]
        for name, script, argv in steps:
            if in_process:
                run.tool(name, script, argv)
            else:
                run(name, [sys.executable, os.path.join(TOOLS, script), *argv], threads=1)

    if recipe == "paper":
        models, marks = _paper_stages(run, s, common, pretrain, pretrain_cp2, data, ck, path)
        for label, (checkpoint, model) in models.items():
            finish(label, checkpoint, model, in_process=True)
    else:
        models, marks = _curriculum_stages(run, s, CURRICULA[size_name], common, pretrain, pretrain_cp2, data, ck, path,
                                           lambda label, checkpoint, model: finish(label, checkpoint, model, False))
    models = {label: model for label, (_, model) in models.items()}

    # 8. the report
    from megatron_rwkvx.evaluation.retrieval_report import write_study_report

    results = {}
    for label in models:
        slug = label.lower().replace("-", "")
        with open(path("eval", slug, "passkey", "passkey.json")) as f:
            passkey = json.load(f)
        with open(path("eval", slug, "mqar", "mqar.json")) as f:
            mqar = json.load(f)
        results[label] = {"passkey": passkey, "mqar": mqar}
    run.times["total"] = time.time() - started
    settings = asdict(size) if recipe == "paper" else {**asdict(size), "curriculum": asdict(CURRICULA[size_name])}
    meta = {"size": size_name, "recipe": recipe, "seed": seed, "settings": settings, "training_lengths": marks,
            "wall_seconds": run.times,
            "command": " ".join(["python", "tools/retrieval_study.py"] + sys.argv[1:]),
            "machine": f"{socket.gethostname()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"Python {platform.python_version()}",
            "load_average_at_end": os.getloadavg()}
    return write_study_report(output, results, meta)


def _paper_stages(run: Runner, s: StudySize, common, pretrain, pretrain_cp2, data, ck, path):
    """Stage 1 and stage 2 of the paper, and the control; ``({label: (checkpoint, .pth)}, {mark: length})``."""
    # 4. stage 1: the sparse blocks only, short context
    run("stage1", pretrain + common + [
        "--init-from", ck("rwkvx-expanded"), "--train-only", "sparse", "--data-path", data["stage1"],
        "--sparse-selection", s.sparse_selection,
        *(["--sparse-top-k", str(-(-s.stage1_seq // s.chunk))] if s.stage1_dense else []),
        *(["--rwkv-fade-in", str(s.stage1_iters // 2), str(3 * s.stage1_iters // 4)] if s.stage1_rwkv_fade_in else []),
        "--seq-length", str(s.stage1_seq), "--micro-batch-size", str(s.batch1), "--global-batch-size", str(s.batch1),
        "--train-iters", str(s.stage1_iters), "--lr", str(s.stage1_lr), "--lr-warmup-iters", str(s.stage1_iters // 20),
        "--eval-interval", str(s.stage1_iters), "--save", ck("stage1")])
    # 5. stage 2 and 6. the control: the same launcher, data, batch, iterations and schedule
    stage2 = common + ["--data-path", data["stage2"], "--seq-length", str(s.stage2_seq), "--micro-batch-size", str(s.batch2),
                       "--global-batch-size", str(s.batch2), "--train-iters", str(s.stage2_iters), "--lr", str(s.stage2_lr),
                       "--min-lr", str(s.stage2_lr / 10), "--lr-decay-style", "cosine",
                       "--lr-warmup-iters", str(s.stage2_iters // 20), "--eval-interval", str(s.stage2_iters)]
    run("stage2", pretrain_cp2 + stage2 + ["--init-from", ck("stage1"), "--save", ck("stage2")], threads=1)
    run("control_rwkv7", pretrain_cp2 + stage2 + ["--init-from", ck("rwkv7"), "--save", ck("control")], threads=1)
    return ({"RWKV-7": (ck("control"), path("models", "rwkv7-control.pth")),
             "RWKV-X": (ck("stage2"), path("models", "rwkvx.pth"))},
            {"stage 1": s.stage1_seq, "stage 2": s.stage2_seq})


CURRICULUM_CHECKPOINTS = ("compact", "no-filler", "fade-in", "filler", "long", "control-compact", "control-no-filler",
                          "control-filler", "control-long")


def _curriculum_stages(run: Runner, s: StudySize, c: CurriculumSize, common, pretrain, pretrain_cp2, data, ck, path,
                       finish: Callable[[str, str, str], None]):
    """The curriculum's five RWKV-X stages and the control's four (``CurriculumSize``), every one with
    the loss on the answers (``--loss-on-spans``). The two lines run side by side, one thread each, and
    each ends with ``finish(label, checkpoint, model)``; returns as ``_paper_stages``."""
    answers = ["--loss-on-spans"]

    def stage(data_path, seq, iters, lr, cosine=False, batch=c.batch):
        return ["--data-path", *data_path, "--seq-length", str(seq), "--micro-batch-size", str(batch),
                "--global-batch-size", str(batch), "--train-iters", str(iters), "--lr", str(lr),
                *(["--min-lr", str(lr / 10), "--lr-decay-style", "cosine", "--lr-warmup-iters", str(min(iters // 15, iters - 1))]
                  if cosine else ["--lr-warmup-iters", str(min(20, iters - 1))]),
                "--eval-interval", str(iters)]

    compact = stage([data["compact"]], c.compact_seq, c.compact_iters, c.compact_lr, cosine=True)
    long = stage(["0.5", data["long-passkey"], "0.5", data["long-filler"]], c.long_seq, c.long_iters, c.lr, batch=c.long_batch)
    silenced = lambda iters: ["--train-only", "sparse", "--rwkv-fade-in", str(iters), str(iters)]  # noqa: E731
    models = {"RWKV-7": (ck("control-long"), path("models", "rwkv7-control.pth")),
              "RWKV-X": (ck("long"), path("models", "rwkvx.pth"))}
    # common carries the curriculum's chunk size and top-k
    rwkvx, rwkvx_cp2 = (launcher + common + ["--sparse-selection", "quest"] + answers for launcher in (pretrain, pretrain_cp2))
    control, control_cp2 = (launcher + common + answers for launcher in (pretrain, pretrain_cp2))

    def rwkvx_line():
        run("compact", rwkvx + compact + silenced(c.compact_iters) + [
            "--init-from", ck("rwkvx-expanded"), "--save", ck("compact")], threads=1)
        run("no-filler", rwkvx + stage([data["no-filler"]], c.seq, c.silenced_iters, c.lr) + silenced(c.silenced_iters)
            + ["--init-from", ck("compact"), "--save", ck("no-filler")], threads=1)
        run("fade-in", rwkvx + stage([data["no-filler"]], c.seq, c.fade_iters, c.lr) + [
            "--train-only", "sparse", "--rwkv-fade-in", "0", str(max(1, 2 * c.fade_iters // 3)),
            "--init-from", ck("no-filler"), "--save", ck("fade-in")], threads=1)
        run("filler", rwkvx_cp2 + stage([data["filler"]], c.seq, c.filler_iters, c.lr) + [
            "--init-from", ck("fade-in"), "--save", ck("filler")], threads=1)
        run("long", rwkvx_cp2 + long + ["--init-from", ck("filler"), "--save", ck("long")], threads=1)
        finish("RWKV-X", *models["RWKV-X"])

    def control_line():  # the same corpora, iterations and schedules (its no-filler stage is one run)
        run("control-compact", control + compact + ["--init-from", ck("rwkv7"), "--save", ck("control-compact")], threads=1)
        run("control-no-filler", control + stage([data["no-filler"]], c.seq, c.silenced_iters + c.fade_iters, c.lr)
            + ["--init-from", ck("control-compact"), "--save", ck("control-no-filler")], threads=1)
        run("control-filler", control_cp2 + stage([data["filler"]], c.seq, c.filler_iters, c.lr) + [
            "--init-from", ck("control-no-filler"), "--save", ck("control-filler")], threads=1)
        run("control-long", control_cp2 + long + ["--init-from", ck("control-filler"), "--save", ck("control-long")],
            threads=1)
        finish("RWKV-7", *models["RWKV-7"])

    run.parallel(rwkvx_line, control_line)
    return models, {"compact layout": c.compact_seq, "filler layout": c.seq, "last stage": c.long_seq}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder for data, checkpoints, logs, evaluations and the report")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_const", const="quick", dest="size",
                   help="shorter training and fewer evaluation lengths (minutes)")
    g.add_argument("--size", choices=sorted(SIZES))
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port of each step (default: a free one)")
    p.add_argument("--sparse-token-shift", action="store_true",
                   help="expand with token-shift mixes on the sparse blocks' query/key/value inputs (not "
                        "in the reference RWKV-X; docs/retrieval_study.md, finding 13)")
    p.add_argument("--stage1-dense", action="store_true",
                   help="stage 1 selects every chunk (exact dense attention), as the paper's stage 1 does "
                        "(context 1024 < chunk 2048 x top-k 3); stage 2 and the evaluation select top-k")
    p.add_argument("--stage1-rwkv-fade-in", action="store_true",
                   help="stage 1 with the base's RWKV-7 blocks silenced for its first half and faded back in "
                        "over the third quarter (pretrain --rwkv-fade-in; not the reference recipe; "
                        "docs/retrieval_study.md, finding 18)")
    p.add_argument("--sparse-selection", choices=SELECTION_RULES, default=MEAN_SELECTION,
                   help="how RWKV-X's sparse blocks select chunks from stage 1 on: mean = the chunk's mean "
                        "key (the reference); quest = Quest's bound (pretrain --sparse-selection)")
    p.add_argument("--recipe", choices=RECIPES, default="paper",
                   help="paper: stage 1 and stage 2 as the paper trains RWKV-X (the default); curriculum: one-letter "
                        "MQAR with 52 keys and the loss on the answers, RWKV-X's RWKV-7 blocks silenced and then faded "
                        "in, chunks selected by Quest's bound, the last stage at 2048 tokens with passkey documents (not the "
                        "paper's recipe; docs/retrieval_study.md, findings 20-24)")
    p.add_argument("--seed", type=int, default=None,
                   help="every training step's --seed (initialisation and data order; default: pretrain's, 1234); "
                        "the corpora and the evaluation documents are the same for every seed")
    p.set_defaults(size="full")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)  # the in-process tools (evaluation); training steps set their own
    variant = {name: True for name in ("sparse_token_shift", "stage1_dense", "stage1_rwkv_fade_in")
               if getattr(args, name)}
    variant["sparse_selection"] = args.sparse_selection
    if args.recipe == "curriculum":
        stage1_flags = [f for f in ("stage1_dense", "stage1_rwkv_fade_in") if variant.get(f)]
        if stage1_flags:
            p.error(f"--recipe curriculum has no stage 1: {', '.join('--' + f.replace('_', '-') for f in stage1_flags)} "
                    "belongs to the paper recipe")
        if args.sparse_selection != "quest" and "--sparse-selection" in (argv if argv is not None else sys.argv):
            p.error("--recipe curriculum selects chunks by Quest's bound (finding 22: with the mean key the lookup "
                    "decays at longer contexts); leave --sparse-selection out")
    summary = run_study(os.path.abspath(args.output), args.size, args.master_port, recipe=args.recipe, seed=args.seed,
                        **variant)
    print(json.dumps(summary["headline"], indent=1))
    print(f"wrote {args.output}/retrieval_study.md and retrieval_study.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
