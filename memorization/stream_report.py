"""The report of a stream plan's evaluation: memorization over tasks, at the end of an example's own task against
the stream's end, and the forgetting of high- against low-memorization examples."""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from memorization.report import save_figure  # noqa: E402
from utils.plots import task_heatmap  # noqa: E402


def _own_against_final(forgetting: dict, final: np.ndarray):
    """Each example's memorization at the end of its own task (x) and at the stream's end (y)."""
    figure, axes = plt.subplots(figsize=(5, 4.5))
    own = forgetting["mem_own"]
    both = np.isfinite(own) & np.isfinite(final)
    axes.scatter(own[both], final[both], s=4, alpha=0.4)
    axes.plot([-1, 1], [-1, 1], color="grey", linewidth=0.8)
    axes.set_xlim(-0.5, 1.05)
    axes.set_ylim(-0.5, 1.05)
    axes.set_xlabel("memorization at the end of the example's task")
    axes.set_ylabel("memorization at the end of the stream")
    figure.tight_layout()
    return figure


def _forgetting_bars(forgetting: dict, low: float, high: float):
    """Mean forgetting (accuracy at the end of the own task − at the stream's end) per memorization bucket, over
    the examples of every task but the last, with its standard error."""
    own, values = forgetting["mem_own"], forgetting["forgetting"]
    buckets = [(f"low (< {low:g})", own < low), ("middle", (own >= low) & (own < high)), (f"high (≥ {high:g})", own >= high)]
    figure, axes = plt.subplots(figsize=(5, 4))
    for x, (name, chosen) in enumerate(buckets):
        picked = values[chosen & forgetting["earlier"]]
        if len(picked):
            se = picked.std(ddof=1) / np.sqrt(len(picked)) if len(picked) > 1 else 0.0
            axes.bar(x, picked.mean(), yerr=se, capsize=4)
            axes.text(x, 0, f"n={len(picked)}", ha="center", va="bottom", fontsize=8)
    axes.set_xticks(range(len(buckets)), [name for name, _ in buckets])
    axes.set_xlabel("memorization at the end of the example's task")
    axes.set_ylabel("forgetting (accuracy drop to the stream's end)")
    figure.tight_layout()
    return figure


def write_stream_report(folder: Path, *, mem: np.ndarray, means: np.ndarray, forgetting: dict, summary: dict,
                        series: dict, args: argparse.Namespace, low: float, sections: list[str] = ()) -> list[Path]:
    """report.md and its figures; returns the written paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    n_tasks = len(mem)
    save_figure(task_heatmap(means, "mean memorization of task i's examples", "memorization", -0.1, 1.0, "{:.2f}",
                       "examples of task i"), folder / "memorization_over_tasks.png", written)
    save_figure(_own_against_final(forgetting, mem[-1]), folder / "own_task_vs_end.png", written)
    save_figure(_forgetting_bars(forgetting, low, args.mem_threshold), folder / "forgetting_by_memorization.png", written)
    lines = ["# Memorization in the stream", "",
             f"{summary['n_models']} learners, {n_tasks} tasks; target: {args.target}. mem_t(i) = mean target of the "
             f"learners that trained on i − of those that did not, after task t, for the examples of tasks 1..t.", "",
             "## Summary", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", "## Mean memorization of task i's examples after task t", "",
              "| after task | " + " | ".join(f"task {i + 1}" for i in range(n_tasks)) + " |",
              "|---|" + "---|" * n_tasks]
    lines += [f"| {t + 1} | " + " | ".join("" if np.isnan(v) else f"{v:.3f}" for v in means[t]) + " |"
              for t in range(n_tasks)]
    lines += ["", "## Per boundary", "", "| after task | " + " | ".join(series) + " |", "|---|" + "---|" * len(series)]
    lines += [f"| {t + 1} | " + " | ".join(f"{series[k][t]:.4f}" for k in series) + " |" for t in range(n_tasks)]
    lines += ["", "## Forgetting and memorization", "",
              f"Forgetting of an example: accuracy of the learners that trained on it at the end of its own task "
              f"minus at the end of the stream (tasks 1..{n_tasks - 1}). High memorization: ≥ {args.mem_threshold:g} "
              f"at the end of its own task; low: < {low:g}.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in written]
    lines += list(sections)
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return [path, *written]
