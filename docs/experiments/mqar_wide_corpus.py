"""Training corpus of one-character-key MQAR documents in the filler layout, one document per window,
the asked values marked (``answers``) for ``preprocess_data.py --loss-spans-key answers``.

    python docs/experiments/mqar_wide_corpus.py --output wide.jsonl --keys 144 --alphabet symbols \
        --seq 2048 --docs 2460 --seed-base 9000000

The retrieval study's driver writes its curriculum corpora the same way (``write_curriculum_corpora``);
this one lets the number of keys go past the 52 letters (docs/retrieval_study.md, finding 25).
"""
import argparse
import json

from megatron_rwkvx.data.retrieval_tasks import TRAIN_SEED_BASE, mqar_document, padded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--keys", type=int, required=True, help="pairs per document, every one asked again")
    p.add_argument("--alphabet", choices=("letters", "symbols"), default="symbols")
    p.add_argument("--seq", type=int, default=2048, help="training window; a document is seq - 1 tokens")
    p.add_argument("--docs", type=int, required=True)
    p.add_argument("--seed-base", type=int, required=True, help=f"first document seed (>= {TRAIN_SEED_BASE})")
    args = p.parse_args()
    if args.seed_base < TRAIN_SEED_BASE:
        p.error(f"--seed-base must be >= {TRAIN_SEED_BASE}: lower seeds are evaluation documents")
    count = lambda text: len(text.encode("utf-8"))  # noqa: E731  (the byte tokenizer)
    with open(args.output, "w", encoding="utf-8") as f:
        for i in range(args.docs):
            doc = mqar_document(args.seq - 1, args.keys, args.keys, args.seed_base + i, count, key_letters=1,
                                alphabet=args.alphabet)
            f.write(json.dumps({"text": padded(doc["text"], args.seq - 1, count), "answers": doc["answer_spans"]}) + "\n")


if __name__ == "__main__":
    main()
