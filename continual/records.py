"""What a run writes down: the task loop tells a `RunRecords` what happened, and it logs it.

The loop (continual/training.py) trains and evaluates; it calls `task_trained` with a task's epoch
losses, `step_measured` with covariates measured between steps (--log_every), and `task_evaluated`
with a task's metrics and the model's record. Here they become MLflow metrics, artifacts and
figures through the run's logger (a `RunLogger`, or a sweep worker's `RecordingLogger`).
Figures are drawn after the last task, and while a run is watched live also every
`FIGURES_EVERY_S` seconds, so a long run's figures stay fresh; `figures=False` leaves them out
(a run whose figures nobody will look at, such as a test's).
"""
from __future__ import annotations

import io
import time

import numpy as np

from continual.evaluation import settings_of
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
        """The task's mean training loss per epoch, one point per epoch of the run (one write per task: a
        store write costs more than an epoch of a small network)."""
        self.logger.log_series("train_loss", epoch_losses, first_step=task * len(epoch_losses))

    def step_measured(self, step: int, covariates: dict[str, float]) -> None:
        self.logger.log_metrics({f"step/{k}": v for k, v in covariates.items()}, step=step)

    def task_evaluated(self, model, dataset, task: int, metrics: dict[str, float], record: dict, state) -> None:
        """The task's metrics, the model's arrays and histograms, and the figures when they are due."""
        logger = self.logger
        logger.log_metrics(metrics, step=task)
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
    """R[t][i] as CSV: one row per trained task t, one column per evaluated task i, empty where unmeasured."""
    out = io.StringIO()
    out.write("after_task," + ",".join(f"task_{i}" for i in range(matrix.shape[1])) + "\n")
    for t, row in enumerate(matrix):
        out.write(f"{t}," + ",".join("" if np.isnan(v) else f"{v:.4f}" for v in row) + "\n")
    return out.getvalue()


def log_tables(model, dataset, logger, state) -> None:
    """The accuracy matrices and the terminal accuracies as CSV."""
    if model.args.eval_scope == "seen":
        for setting, matrix in state.matrices.items():
            logger.log_text(matrix_csv(matrix), f"accuracy/{setting}.csv")
    test = state.terminal_accuracy(settings_of(dataset)[0])
    train = np.array(state.history["terminal_train_acc"])
    logger.log_text("task,terminal_test_acc,terminal_train_acc\n" + "".join(
        f"{t},{a:.4f},{b:.4f}\n" for t, (a, b) in enumerate(zip(test, train))), "accuracy/terminal.csv")


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
    figure = terminal_accuracy_figure(test, np.array(state.history["terminal_train_acc"]))
    logger.log_figure(figure, "accuracy/terminal.png")
    close(figure)
    if model.plasticity.units is None:
        return
    from utils.covariate_plots import COVARIATE_PLOTS, age_histogram, covariate_figure

    for prefix, title in COVARIATE_PLOTS:
        if prefix in state.history or any(k.startswith(prefix + "/") for k in state.history):
            figure = covariate_figure(state.history, prefix, title)
            logger.log_figure(figure, f"plasticity/{prefix}.png")
            close(figure)
    for unit in ("steps", "tokens"):
        figure = age_histogram({k: v.cpu().numpy() for k, v in model.plasticity.units.monitor.ages(unit).items()},
                               unit, f"neuron ages ({unit} since firing) after task {task + 1}")
        logger.log_figure(figure, f"plasticity/ages_{unit}.png")
        close(figure)


