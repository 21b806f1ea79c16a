"""Passkey training documents with their answers marked (finding 23 of docs/retrieval_study.md).

An experiment record, not a tool (no tests; run it from the repository root with the package
installed). Each line is one passkey document in the evaluation's format (``sample_corpus.
passkey_document``: intro, filler, the needle at a random depth, the question) followed by its answer
`` 12345.``, padded with newlines to exactly ``--length`` bytes, with ``"answers"``: the span of
`` 12345.`` (``retrieval_tasks.passkey_answer_span``: the space and the period too, as the evaluator
asks a model to write them), for ``tools/preprocess_data.py --loss-spans-key answers`` and ``pretrain --loss-on-spans``.
Training seeds start at 7,000,000 (``eval_passkey.py`` uses 0, 1, ...; the study's corpora use
``TRAIN_SEED_BASE`` + part x 1,000,000 for parts below 7).

  python docs/experiments/passkey_spans.py 20000 pk511.jsonl --length 511
"""
import argparse
import json

from megatron_rwkvx.data.retrieval_tasks import passkey_training_document
from megatron_rwkvx.data.tokenizers import ByteTokenizer

TRAIN_SEEDS = 7_000_000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("count", type=int)
    p.add_argument("path")
    p.add_argument("--length", type=int, default=511, help="bytes per document (one window of length + 1)")
    args = p.parse_args()
    tok = ByteTokenizer()
    count = lambda s: len(tok.tokenize(s))  # noqa: E731
    with open(args.path, "w") as f:
        for i in range(args.count):
            doc = passkey_training_document(args.length, TRAIN_SEEDS + i, count)
            f.write(json.dumps({"text": doc["text"], "answers": doc["answer_spans"]}) + "\n")


if __name__ == "__main__":
    main()
