"""MQAR accuracy (solid) and chunk-selection hit rate (dashed) against context length for several
models' ``tools/eval_mqar.py`` records, with the goal's lines (90% for RWKV-X, 50% for the control)
and the training length marked: the figure of docs/retrieval_study.md, finding 25.

    python docs/experiments/mqar_wide_figure.py --output fig.png --title "..." --trained 2048 \
        "RWKV-X, top-16=ev/X/mqar.json" "RWKV-7 control=ev/C/mqar.json"
"""
import argparse
import json

from megatron_rwkvx.evaluation.retrieval import accuracy_by_length


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--title", required=True)
    p.add_argument("--trained", type=int, required=True, help="the models' last training length (a vertical line)")
    p.add_argument("runs", nargs="+", help="LABEL=path/to/mqar.json")
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.6), layout="constrained")
    every_length = set()
    for i, run in enumerate(args.runs):
        label, path = run.split("=", 1)
        stats = accuracy_by_length(json.load(open(path, encoding="utf-8")))
        lengths = list(stats)
        every_length |= set(lengths)
        color = f"C{i}"
        ax.plot(lengths, [s["accuracy"] for s in stats.values()], "o-", color=color, label=f"{label}: accuracy")
        if stats[lengths[0]]["hit_rate"] is not None:  # a model with sparse layers
            ax.plot(lengths, [s["hit_rate"] for s in stats.values()], "s--", color=color, alpha=0.6,
                    label=f"{label}: value's chunk selected")
    ax.axhline(0.9, color="green", lw=0.8, ls=":", label="goal for RWKV-X (>= 90%)")
    ax.axhline(0.5, color="red", lw=0.8, ls=":", label="goal for the control (< 50%)")
    ax.axhline(0.1, color="gray", lw=0.8, ls=":", label="chance (10%)")
    ax.axvline(args.trained, color="black", lw=0.8)
    ax.text(args.trained, 0.02, f" trained at {args.trained}", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(every_length), [str(n) for n in sorted(every_length)])
    ax.set_xlim(min(every_length) / 1.25, max(every_length) * 1.25)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("fraction of queries")
    ax.set_ylim(0, 1.02)
    ax.set_title(args.title, fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(args.output, dpi=90)


if __name__ == "__main__":
    main()
