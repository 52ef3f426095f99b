"""Figures logged as artifacts (matplotlib, no display needed)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def accuracy_heatmap(matrix: np.ndarray, title: str):
    """R[t][i] as a heatmap with the numbers written in, blank where not measured; tasks counted from 1 on both
    axes (matrix row t is task t + 1)."""
    return task_heatmap(matrix, title, "accuracy (%)", 0, 100, "{:.0f}", "evaluated task i")


def task_heatmap(matrix: np.ndarray, title: str, value_label: str, vmin: float, vmax: float, fmt: str,
                 xlabel: str):
    """A [T, T] matrix of a value per (boundary t, task i) as a heatmap with the values written in (`fmt`), blank
    where NaN; tasks counted from 1 on both axes (matrix row t is task t + 1)."""
    n = matrix.shape[0]
    size = min(0.6 * n + 2, 16)
    figure, axes = plt.subplots(figsize=(size, size * 0.85))
    # Cell (t, i) is drawn centred on (i + 1, t + 1), so any ticks matplotlib chooses read as task numbers.
    image = axes.imshow(np.ma.masked_invalid(matrix), vmin=vmin, vmax=vmax, cmap="viridis",
                        extent=(0.5, n + 0.5, n + 0.5, 0.5))
    figure.colorbar(image, ax=axes, label=value_label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("after training task t")
    axes.set_title(title)
    if n <= 20:
        axes.set_xticks(range(1, n + 1))
        axes.set_yticks(range(1, n + 1))
        for t in range(n):
            for i in range(n):
                if not np.isnan(matrix[t, i]):
                    light = (matrix[t, i] - vmin) < 0.6 * (vmax - vmin)
                    axes.text(i + 1, t + 1, fmt.format(matrix[t, i]), ha="center", va="center", fontsize=8,
                              color="white" if light else "black")
    else:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    return figure


def close(figure) -> None:
    plt.close(figure)


def value_histogram(everything: np.ndarray, kept: np.ndarray, title: str):
    """The task's memorization values against those of the examples the buffer kept (density)."""
    figure, axes = plt.subplots(figsize=(6, 4))
    everything, kept = everything[np.isfinite(everything)], kept[np.isfinite(kept)]
    if len(everything):
        bins = np.histogram_bin_edges(everything, bins=30)
        axes.hist(everything, bins=bins, density=True, alpha=0.5, label=f"task examples ({len(everything)})")
        axes.hist(kept, bins=bins, density=True, alpha=0.7, label=f"kept in the buffer ({len(kept)})")
        axes.legend()
    axes.set_xlabel("memorization value")
    axes.set_ylabel("density")
    axes.set_title(title)
    figure.tight_layout()
    return figure


def terminal_accuracy_figure(test: np.ndarray, train: np.ndarray):
    """Each task's test accuracy right after training it, and its training accuracy then, against tasks."""
    figure, axes = plt.subplots(figsize=(7, 4))
    tasks = np.arange(1, len(test) + 1)
    axes.plot(tasks, test, label="terminal test accuracy", marker="." if len(test) <= 50 else None)
    axes.plot(tasks, train, label="training accuracy at the end of the task", alpha=0.7)
    axes.set_xlabel("task")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.legend()
    figure.tight_layout()
    return figure


def task_accuracy_curves(matrix: np.ndarray, title: str):
    """The classic continual-learning plot: each task's accuracy (a line per task) against tasks trained."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    n = matrix.shape[0]
    for task in range(n):
        trained = np.arange(task, n)
        values = matrix[task:, task]
        if np.isfinite(values).any():
            axes.plot(trained + 1, values, marker="." if n <= 30 else None, label=f"task {task + 1}")
    axes.set_xlabel("tasks trained")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(title)
    if n <= 20:
        axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure
