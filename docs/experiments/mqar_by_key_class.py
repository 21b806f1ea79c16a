"""Accuracy and selection hit rate of ``tools/eval_mqar.py`` records by the class of the asked key:
the 52 letters, the 28 ASCII punctuation keys and the 64 Latin-1 letters of the symbols alphabet
(``megatron_rwkvx.data.retrieval_tasks.ONE_SYMBOL_KEYS``), per length.

    python docs/experiments/mqar_by_key_class.py out/mqar/mqar.json [more mqar.json ...]
"""
import json
import string
import sys
from collections import defaultdict


def key_class(key: str) -> str:
    if key in string.ascii_letters:
        return "letters"
    return "punctuation" if key in string.punctuation else "latin-1"


def main() -> None:
    for path in sys.argv[1:]:
        cells = defaultdict(lambda: [0, 0, 0])  # (length, class) -> [queries, correct, hits]
        for r in json.load(open(path, encoding="utf-8")):
            for cls in (key_class(r["key"]), "all"):
                cell = cells[(r["length"], cls)]
                cell[0] += 1
                cell[1] += bool(r["correct"])
                cell[2] += bool(r.get("hit"))
        classes = ("letters", "punctuation", "latin-1", "all")
        print(f"{path}\n\n| length | " + " | ".join(classes) + " |\n|---|" + "---|" * len(classes))
        for length in sorted({k[0] for k in cells}):
            row = []
            for cls in classes:
                n, right, hit = cells.get((length, cls), (0, 0, 0))
                row.append(f"{right / n:.1%} (hit {hit / n:.0%}, n={n})" if n else "-")
            print(f"| {length} | " + " | ".join(row) + " |")
        print()


if __name__ == "__main__":
    main()
