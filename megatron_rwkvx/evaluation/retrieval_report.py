"""The retrieval study's report: one figure (passkey heatmaps of both models side by side, MQAR
accuracy and selection hit rate by length), markdown tables and a json summary.

``results`` maps a model label ("RWKV-7", "RWKV-X") to ``{"passkey": records, "mqar": records}``
as ``tools/eval_passkey.py`` and ``tools/eval_mqar.py`` write them.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from megatron_rwkvx.evaluation import passkey
from megatron_rwkvx.evaluation.retrieval import accuracy_by_length as by_length
from megatron_rwkvx.evaluation.retrieval import format_table as mqar_table
from megatron_rwkvx.evaluation.retrieval import read_weight_by_length


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0%}"


def results_table(results: Dict[str, Dict]) -> str:
    """One row per model and task, one column per length: accuracy (selection hit rate / the hit
    rate of a random selection)."""
    lengths = sorted({r["length"] for res in results.values() for task in res.values() for r in task})
    lines = ["| model | task | " + " | ".join(str(n) for n in lengths) + " |", "|---|---|" + "---|" * len(lengths)]
    for label, res in results.items():
        for task in ("passkey", "mqar"):
            stats = by_length(res[task])
            cells = []
            for n in lengths:
                s = stats.get(n)
                if s is None:
                    cells.append("")
                else:
                    hit = f" ({_pct(s['hit_rate'])} / {_pct(s['hit_chance'])})" if s["hit_rate"] is not None else ""
                    cells.append(_pct(s["accuracy"]) + hit)
            lines.append(f"| {label} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_figure(results: Dict[str, Dict], path: str, marks: Dict[str, int]) -> None:
    """Passkey accuracy heatmaps (length x depth) for each model side by side, and MQAR accuracy
    (solid) and chunk-selection hit rate (dashed) against length; ``marks``: training lengths
    drawn as labelled vertical lines (``{"stage 1": 1024, "stage 2": 2048}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    fig, axes = plt.subplots(1, len(labels) + 1, figsize=(5.4 * (len(labels) + 1), 4.4), layout="constrained",
                             gridspec_kw={"width_ratios": [1] * len(labels) + [1.3]})
    image = None
    for ax, label in zip(axes, labels):
        lengths, depths, grid = passkey.accuracy_grid(results[label]["passkey"])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{label}: passkey accuracy")
        for y, row in enumerate(grid):
            for x, v in enumerate(row):
                ax.text(x, y, f"{v:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=axes[len(labels) - 1], fraction=0.06, label="passkey accuracy")
    ax = axes[-1]
    for label, color in zip(labels, ("tab:blue", "tab:red", "tab:green")):
        stats = by_length(results[label]["mqar"])
        xs = list(stats)
        ax.plot(xs, [s["accuracy"] for s in stats.values()], "o-", color=color, label=f"{label} accuracy")
        hits = [s["hit_rate"] for s in stats.values()]
        if any(h is not None for h in hits):
            ax.plot(xs, hits, "s--", color=color, alpha=0.7, label=f"{label} selection hit rate")
            ax.plot(xs, [s["hit_chance"] for s in stats.values()], ":", color=color, alpha=0.5,
                    label=f"{label} hit rate of a random selection")
    for (name, length), color in zip(marks.items(), ("grey", "black", "tab:brown")):
        if not xs[0] <= length <= xs[-1]:  # shorter than any evaluation: its label would sit on the next one's
            continue
        ax.axvline(length, color=color, ls=":", lw=1)
        ax.text(length, 1.02, name, ha="center", fontsize=8)
    ax.axhline(0.1, color="grey", lw=0.8, alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(n) for n in xs])
    ax.minorticks_off()
    ax.set_ylim(-0.03, 1.08)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("fraction of queries")
    ax.set_title("MQAR: accuracy and selection hit rate (grey line: chance)")
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def headline(results: Dict[str, Dict], length: int) -> Dict[str, Optional[float]]:
    """Accuracies and hit rates at ``length`` (the goal's 4x stage-2 length)."""
    out = {"length": length}
    for label, res in results.items():
        for task in ("passkey", "mqar"):
            s = by_length(res[task]).get(length, {})
            out[f"{label} {task} accuracy"] = s.get("accuracy")
            if s.get("hit_rate") is not None:
                out[f"{label} {task} hit rate"] = s["hit_rate"]
        read = read_weight_by_length(res["passkey"]).get(length)
        if read:
            out[f"{label} passkey read weight"] = max(read["read_weight"])
    return out


def write_study_report(output: str, results: Dict[str, Dict], meta: Dict) -> Dict:
    """``retrieval_study.png``, ``.md`` and ``.json`` in ``output``; returns the json summary."""
    settings = meta["settings"]
    # The training lengths to mark; the goal is read at 4x the last (the paper's stage 2).
    marks = meta.get("training_lengths") or {"stage 1": settings["stage1_seq"], "stage 2": settings["stage2_seq"]}
    png = os.path.join(output, "retrieval_study.png")
    draw_figure(results, png, marks)
    summary = {"headline": headline(results, 4 * max(marks.values())), **meta,
               "by_length": {label: {task: {str(n): v for n, v in by_length(recs).items()} for task, recs in res.items()}
                             for label, res in results.items()},
               "passkey_read_weight": {label: {str(n): v for n, v in read_weight_by_length(res["passkey"]).items()}
                                       for label, res in results.items()}}
    with open(os.path.join(output, "retrieval_study.json"), "w") as f:
        json.dump(summary, f, indent=1)
    times = ", ".join(f"{k} {v:.0f} s" for k, v in meta["wall_seconds"].items())
    passkey_tables = "\n\n".join(f"{label}:\n\n{passkey.format_table(res['passkey'])}" for label, res in results.items())
    mqar_tables = "\n\n".join(f"{label}:\n\n{mqar_table(res['mqar'])}" for label, res in results.items())
    recipe = f", {meta['recipe']} recipe" if meta.get("recipe") else ""
    md = (f"# Retrieval study ({meta['size']}{recipe})\n\n![figure](retrieval_study.png)\n\n"
          f"Accuracy by context length; in parentheses the chunk-selection hit rate / that of a random selection:\n\n{results_table(results)}\n\n"
          f"Passkey accuracy by depth:\n\n{passkey_tables}\n\n"
          f"MQAR by length (pair-list hit rate: a selected chunk lies in the pair list at all):\n\n{mqar_tables}\n\n"
          f"Command: `{meta['command']}`  \nMachine: {meta['machine']}  \nWall time: {times}\n")
    with open(os.path.join(output, "retrieval_study.md"), "w") as f:
        f.write(md)
    return summary

