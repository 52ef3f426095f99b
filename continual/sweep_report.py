"""The comparison report of a sweep, built from its runs in MLflow (so --report_only rebuilds the same report).

Written to a folder and logged to the parent run under report/: report.md (chosen configurations,
the selection metric, every metric after the last task as mean ± std over the final seeds, each
configuration's search score), terminal_accuracy.png and resets.png (per task, per method),
summary.csv, runs.csv (every cell) and per_task.csv (the final runs, task by task).
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from continual.evaluation import TERMINAL_TEST, TERMINAL_TRAIN, is_per_task
from continual.sweep_runs import SweepTracker
from continual.sweep_spec import Sweep
from utils.plots import close, plt

# The per-task series of the final runs: column name → metric key.
PER_TASK = {"terminal_test_acc": TERMINAL_TEST, "terminal_train_acc": TERMINAL_TRAIN, "resets": "plasticity/resets"}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def shown(values: list[float], total: int) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    text = f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}"
    return text if len(values) == total else f"{text} ({len(values)} of {total} runs)"


def config_text(config: dict | None) -> str:
    if config is None:
        return "not chosen yet"
    return ", ".join(f"{k}={v}" for k, v in config.items()) or "(base)"


def reported(name: str) -> bool:
    """Metrics summarising a run after its last task (not one task's value, not per-epoch or per-step ones)."""
    return not is_per_task(name) and not name.startswith(("step/", "epoch/"))


def breakdown(name: str) -> bool:
    """A per-layer breakdown of a metric (`covariates/dormant_frac/fc1`): in summary.csv, not in the report's
    table nor the parent run's metrics."""
    return name.count("/") > 1


def histories(tracker: SweepTracker, run) -> dict[str, np.ndarray]:
    """Per-task values of the final runs' accuracy and resets (a method without resets: zeros)."""
    out = {}
    for column, key in PER_TASK.items():
        points = sorted((m.step, m.value) for m in tracker.client.get_metric_history(run.info.run_id, key))
        out[column] = np.array([value for _, value in points], dtype=float)
    if len(out["resets"]) == 0:
        out["resets"] = np.zeros(len(out["terminal_test_acc"]))
    return out


def write_report(sweep: Sweep, choices: dict, tracker: SweepTracker, out: Path) -> dict:
    """Build the report from MLflow, write it into `out`, log it to the parent run; returns its parts."""
    out.mkdir(parents=True, exist_ok=True)
    runs = tracker.runs
    finals: dict[str, list] = {}  # method → its finished final runs
    for method in sweep.methods:
        choice = choices.get(method)
        cells = sweep.cells(method, choice.config, sweep.final_seeds) if choice and choice.config is not None else []
        finals[method] = [runs[c.key] for c in cells if c.key in runs and runs[c.key].info.status == "FINISHED"]
    series = {m: [histories(tracker, run) for run in finished] for m, finished in finals.items()}
    # method → per final run, its metrics after the last task, with the resets summarised per task
    results = {m: [{**run.data.metrics, "resets_per_task": float(values["resets"].mean()) if len(values["resets"])
                    else 0.0} for run, values in zip(finished, series[m])] for m, finished in finals.items()}
    metric_names = sorted({k for per_run in results.values() for metrics in per_run for k in metrics if reported(k)})
    total = len(sweep.final_seeds)

    lines = [f"# Sweep {sweep.name}", "",
             f"Selection on `{sweep.metric}` after the last task ({'higher' if sweep.mode == 'max' else 'lower'} is "
             f"better), each configuration's mean over the search seeds {sweep.search_seeds}. The chosen "
             f"configuration of each method ran again with the final seeds {sweep.final_seeds}; the numbers are "
             f"mean ± sample std (ddof 1) over those final runs.", "",
             f"| method | chosen configuration | configurations searched | {sweep.metric} (search) | "
             f"{sweep.metric} (final) |", "|---|---|---|---|---|"]
    for method in sweep.methods:
        choice = choices.get(method)
        if choice is None:
            lines.append(f"| {method} | not searched yet (it reuses a method without a choice) | | | |")
            continue
        score = dict((config_text(c), s) for c, s in choice.scores).get(config_text(choice.config), math.nan)
        searched = f"{len(choice.scores)}" + (f" ({choice.missing} search runs missing)" if choice.missing else "")
        final = shown([m[sweep.metric] for m in results[method] if sweep.metric in m], total)
        lines.append(f"| {method} | {config_text(choice.config)} | {searched} | "
                     f"{'—' if math.isnan(score) else f'{score:.2f}'} | {final} |")
    lines += ["", "## Every metric after the last task, mean ± std over the final seeds", "",
              "| metric | " + " | ".join(sweep.methods) + " |", "|---|" + "---|" * len(sweep.methods)]
    for name in metric_names:
        if breakdown(name):
            continue
        cells = [shown([m[name] for m in results[method] if name in m], total) for method in sweep.methods]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Search: each configuration's mean over the search seeds (NaN: a run diverged)", ""]
    for method, choice in choices.items():
        lines.append(f"- **{method}**: " + "; ".join(
            f"{config_text(c)}: {s:.2f}{' (chosen)' if c == choice.config else ''}" for c, s in choice.scores))
    lines += ["", "![terminal accuracy per task](terminal_accuracy.png)", "", "![resets per task](resets.png)", ""]
    text = "\n".join(lines)

    files = {"report.md": text, "summary.csv": _summary_csv(results, metric_names),
             "runs.csv": _runs_csv(sweep, choices, tracker), "per_task.csv": _per_task_csv(finals, series)}
    for name, content in files.items():  # through a name of this process's: drivers sharing the sweep write it too
        temporary = out / f".{name}.{os.getpid()}.tmp"
        temporary.write_text(content)
        os.replace(temporary, out / name)
    _figures(sweep, series, out)
    for name in [*files, "terminal_accuracy.png", "resets.png"]:
        tracker.parent.log_artifact(str(out / name), "report")
    parent_metrics = {}
    for method, per_run in results.items():
        for name in metric_names:
            values = [m[name] for m in per_run if name in m]
            if values and not breakdown(name):
                parent_metrics[f"{method}/{name}"], parent_metrics[f"{method}/{name}_std"] = mean_std(values)
    if parent_metrics:
        tracker.parent.log_metrics(parent_metrics, step=0)
    return {"text": text, "results": results, "metrics": metric_names}


def _csv(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _summary_csv(results: dict, metric_names: list[str]) -> str:
    rows = []
    for method, per_run in results.items():
        for name in metric_names:
            values = [m[name] for m in per_run if name in m]
            if values:
                rows.append([method, name, *mean_std(values), len(values)])
    return _csv(["method", "metric", "mean", "std", "n_runs"], rows)


def _runs_csv(sweep: Sweep, choices: dict, tracker: SweepTracker) -> str:
    """Every cell of the sweep with its configuration and its metrics after the last task."""
    cells = []
    for method, choice in choices.items():
        cells += [(c, "search") for c in sweep.search_cells(method, _reused(sweep, method, choices))]
        if choice.config is not None:
            cells += [(c, "final") for c in sweep.cells(method, choice.config, sweep.final_seeds)]
    names = sorted({k for cell, _ in cells if cell.key in tracker.runs
                    for k in tracker.runs[cell.key].data.metrics if reported(k)})
    rows = []
    for cell, phase in cells:
        run = tracker.runs.get(cell.key)
        metrics = run.data.metrics if run else {}
        status = "missing" if run is None else run.data.tags.get("sweep_outcome", run.info.status.lower())
        rows.append([cell.method, phase, config_text(cell.config), cell.seed, cell.key,
                     run.info.run_id if run else "", status, *(metrics.get(k, "") for k in names)])
    return _csv(["method", "phase", "configuration", "seed", "cell", "run_id", "outcome", *names], rows)


def _reused(sweep: Sweep, method: str, choices: dict) -> dict[str, dict]:
    return {name: choices[name].config for name in sweep.methods[method].reuse}


def _per_task_csv(finals: dict, series: dict) -> str:
    rows = []
    for method, finished in finals.items():
        for run, values in zip(finished, series[method]):
            for task in range(len(values["terminal_test_acc"])):
                rows.append([method, run.data.tags.get("sweep_cell"), run.info.run_id, task + 1,
                             *(values[k][task] if task < len(values[k]) else "" for k in PER_TASK)])
    return _csv(["method", "cell", "run_id", "task", *PER_TASK], rows)  # tasks counted from 1


def _figures(sweep: Sweep, series: dict, out: Path) -> None:
    """Terminal test and training accuracy per task, and resets per task: mean ± std over the final seeds."""
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    resets_figure, resets_axes = plt.subplots(figsize=(6.5, 4.2))
    for method, per_run in series.items():
        if not per_run:
            continue
        for ax, key in ((axes[0], "terminal_test_acc"), (axes[1], "terminal_train_acc"), (resets_axes, "resets")):
            length = min(len(v[key]) for v in per_run)
            values = np.stack([v[key][:length] for v in per_run])
            tasks = np.arange(1, length + 1)
            mean = values.mean(0)
            ax.plot(tasks, mean, label=method)
            if len(per_run) > 1:
                std = values.std(0, ddof=1)
                ax.fill_between(tasks, mean - std, mean + std, alpha=0.2)
    axes[0].set_ylabel("terminal test accuracy (%)")
    axes[1].set_ylabel("terminal training accuracy (%)")
    resets_axes.set_ylabel("units reset during the task")
    for ax in (*axes, resets_axes):
        ax.set_xlabel("task")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    seeds = f"mean ± std over final seeds {sweep.final_seeds}"
    figure.suptitle(f"{sweep.name}: terminal accuracy of each task, {seeds}")
    resets_axes.set_title(f"{sweep.name}: resets per task,\n{seeds}", fontsize=10)
    for fig, name in ((figure, "terminal_accuracy.png"), (resets_figure, "resets.png")):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        close(fig)
