"""What a run writes down: the task loop tells a `RunRecords` what happened, and it logs it.

The loop (continual/training.py) trains and evaluates; it calls `task_trained` with a task's epoch
losses, `step_measured` with covariates measured between steps (--log_every), and `task_evaluated`
with a task's metrics and the model's record. Here they become MLflow metrics, artifacts and
figures through the run's logger (a `RunLogger`, or a sweep worker's `RecordingLogger`).

Each family of metrics has one meaning of MLflow's step: task-level metrics are logged at step = the
number of tasks trained (1 after the first task), `epoch/...` at the epoch's number in the run (1 for
the first epoch of the first task), `step/...` at the number of optimizer steps made. Everything a
user reads counts tasks from 1 (the console, metric names, CSV tables, figure axes, artifact names);
the code counts them from 0.
Figures are drawn after the last task, and while a run is watched live also every
`FIGURES_EVERY_S` seconds, so a long run's figures stay fresh; `figures=False` leaves them out
(a run whose figures nobody will look at, such as a test's).
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np

from continual.evaluation import (
    LAST_TENTH,
    TERMINAL_TEST,
    TERMINAL_TRAIN,
    last_tenth,
    settings_of,
    summary_metrics,
    windows,
)
from utils.plots import (
    accuracy_heatmap,
    close,
    task_accuracy_curves,
    terminal_accuracy_figure,
    value_histogram,
)

FIGURES_EVERY_S = 60.0


class RunRecords:
    """Writes a run's record into `logger` as the task loop reports its progress."""

    def __init__(self, logger, figures: bool = True):
        self.logger = logger
        self.figures = figures
        self.figures_drawn_at = time.monotonic()

    def task_trained(self, task: int, epoch_losses: list[float]) -> None:
        """The task's mean training loss per epoch, at the epoch's number in the run (one write per task: a
        store write costs more than an epoch of a small network)."""
        self.logger.log_series("epoch/train_loss", epoch_losses, first_step=task * len(epoch_losses) + 1)

    def step_measured(self, step: int, covariates: dict[str, float]) -> None:
        self.logger.log_metrics({f"step/{k}": v for k, v in covariates.items()}, step=step)

    def task_evaluated(self, model, dataset, task: int, metrics: dict[str, float], record: dict, state) -> None:
        """The task's metrics, the model's arrays and histograms, and the figures when they are due."""
        logger = self.logger
        logger.log_metrics(metrics, step=task + 1)
        for name, array in record.get("arrays", {}).items():
            logger.log_array(array, name)
        for name, (everything, kept) in record.get("histograms", {}).items():
            figure = value_histogram(everything, kept, f"memorization values after task {task + 1}")
            logger.log_figure(figure, name)
            close(figure)
        due = logger.LIVE and time.monotonic() - self.figures_drawn_at >= FIGURES_EVERY_S
        if task == dataset.n_tasks - 1 or due:
            log_tables(model, dataset, logger, state)
            if self.figures:
                log_figures(model, dataset, task, logger, state)
            self.figures_drawn_at = time.monotonic()


def matrix_csv(matrix: np.ndarray) -> str:
    """R[t][i] as CSV: one row per trained task t, one column per evaluated task i, both counted from 1, empty
    where unmeasured."""
    out = io.StringIO()
    out.write("after_task," + ",".join(f"task_{i + 1}" for i in range(matrix.shape[1])) + "\n")
    for t, row in enumerate(matrix):
        out.write(f"{t + 1}," + ",".join("" if np.isnan(v) else f"{v:.4f}" for v in row) + "\n")
    return out.getvalue()


def terminal_csv(test: np.ndarray, train: np.ndarray) -> str:
    """Each finished task's terminal test and training accuracy, tasks counted from 1."""
    return "task,terminal_test_acc,terminal_train_acc\n" + "".join(
        f"{t + 1},{a:.4f},{b:.4f}\n" for t, (a, b) in enumerate(zip(test, train)))


def log_tables(model, dataset, logger, state) -> None:
    """The accuracy matrices and the terminal accuracies as CSV."""
    if model.args.eval_scope == "seen":
        for setting, matrix in state.matrices.items():
            logger.log_text(matrix_csv(matrix), f"accuracy/{setting}.csv")
    test = state.terminal_accuracy(settings_of(dataset)[0])
    logger.log_text(terminal_csv(test, np.array(state.history[TERMINAL_TRAIN])), "accuracy/terminal.csv")


def summary_table(state, args: argparse.Namespace) -> str:
    """What the console shows at the end of a run: the accuracy matrices with the run's summary metrics, or, for
    a terminal-only evaluation, the mean terminal accuracies over the run and over each window it logs."""
    n_tasks = next(iter(state.matrices.values())).shape[0]
    lines = []
    if args.eval_scope == "current":
        for name, label in ((TERMINAL_TEST, "terminal test accuracy"), (TERMINAL_TRAIN, "terminal training accuracy")):
            values = state.history.get(name, [])
            means = [f"all {len(values)} tasks: {np.mean(values):.2f}"]
            means += [f"last {k}: {np.mean(values[-k:]):.2f}" for k in windows(args.last_k, n_tasks)
                      if len(values) >= k]
            lines.append(f"{label} (%), mean over " + "  ".join(means))
        summary = last_tenth(np.asarray(state.history.get(TERMINAL_TEST, [])), n_tasks)
        if summary:
            lines.append(f"SNR's summary, mean terminal test accuracy of the last 10% of tasks ({LAST_TENTH}): "
                         f"{summary[LAST_TENTH]:.2f}")
        return "\n".join(lines)
    last = state.next_task - 1
    for setting, matrix in state.matrices.items():
        lines.append(f"\n{setting.replace('_', '-')} accuracy (%), row t = after training task t (tasks from 1)")
        lines.append("        " + "".join(f"{f'task {i + 1}':>9}" for i in range(matrix.shape[1])))
        for t in range(last + 1):
            cells = "".join(f"{'' if np.isnan(v) else f'{v:.2f}':>9}" for v in matrix[t])
            lines.append(f"after {t + 1:<2}" + cells)
        final = summary_metrics({setting: matrix}, last)
        lines.append("  ".join(f"{k}: {v:.2f}" for k, v in final.items()))
    return "\n".join(lines)


def log_figures(model, dataset, task: int, logger, state) -> None:
    """Accuracy matrices (or terminal accuracies), and the covariates against tasks."""
    if model.args.eval_scope == "seen":
        for setting, matrix in state.matrices.items():
            figure = accuracy_heatmap(matrix, f"{setting.replace('_', '-')} accuracy (%)")
            logger.log_figure(figure, f"accuracy/{setting}.png")
            close(figure)
            figure = task_accuracy_curves(matrix, f"{setting.replace('_', '-')} accuracy of each task")
            logger.log_figure(figure, f"accuracy/{setting}_per_task.png")
            close(figure)
    test = state.terminal_accuracy(settings_of(dataset)[0])
    figure = terminal_accuracy_figure(test, np.array(state.history[TERMINAL_TRAIN]))
    logger.log_figure(figure, "accuracy/terminal.png")
    close(figure)
    if model.plasticity.units is None:
        return
    from utils.covariate_plots import COVARIATE_PLOTS, age_histogram, covariate_figure

    for prefix, title in COVARIATE_PLOTS:
        if prefix in state.history or any(k.startswith(prefix + "/") for k in state.history):
            figure = covariate_figure(state.history, prefix, title)
            logger.log_figure(figure, f"plasticity/{prefix.rsplit('/', 1)[-1]}.png")
            close(figure)
    for unit in ("steps", "tokens"):
        figure = age_histogram({k: v.cpu().numpy() for k, v in model.plasticity.units.monitor.ages(unit).items()},
                               unit, f"neuron ages ({unit} since firing) after task {task + 1}")
        logger.log_figure(figure, f"plasticity/ages_{unit}.png")
        close(figure)


