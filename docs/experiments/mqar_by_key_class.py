"""Accuracy and selection hit rate of ``tools/eval_mqar.py`` records by the class of the asked key:
the 52 letters, the 28 ASCII punctuation keys and the 64 Latin-1 letters of the symbols alphabet
(``megatron_rwkvx.data.retrieval_tasks.ONE_SYMBOL_KEYS``), per length.

    python docs/experiments/mqar_by_key_class.py out/mqar/mqar.json [more mqar.json ...]
"""
import json
import string
import sys


def key_class(key: str) -> str:
    if key in string.ascii_letters:
        return "letters"
    return "punctuation" if key in string.punctuation else "latin-1"


def main() -> None:
    from megatron_rwkvx.evaluation.retrieval import accuracy_by_length

    classes = ("letters", "punctuation", "latin-1", "all")
    for path in sys.argv[1:]:
        records = json.load(open(path, encoding="utf-8"))
        stats = {cls: accuracy_by_length([r for r in records if cls in ("all", key_class(r["key"]))]) for cls in classes}
        print(f"{path}\n\n| length | " + " | ".join(classes) + " |\n|---|" + "---|" * len(classes))
        for length in sorted({r["length"] for r in records}):
            row = []
            for cls in classes:
                s = stats[cls].get(length)
                hit = "-" if s is None or s["hit_rate"] is None else f"{s['hit_rate']:.0%}"
                row.append(f"{s['accuracy']:.1%} (hit {hit}, n={s['count']})" if s else "-")
            print(f"| {length} | " + " | ".join(row) + " |")
        print()


if __name__ == "__main__":
    main()
