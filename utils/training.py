"""The task loop: train each task, evaluate every seen task, log, checkpoint."""
from __future__ import annotations

import argparse
import io
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from utils.continual_dataset import ContinualDataset
from utils.continual_model import ContinualModel
from utils.errors import TrainingDiverged
from utils.evaluation import accuracy_by_bucket, empty_matrix, evaluate, settings_of, summary_metrics
from utils.mlflow_logger import RunLogger
from utils.plots import accuracy_heatmap, close, value_histogram

LOSS_REFRESH_STEPS = 20  # read the loss back from the device this often (progress bar and NaN check)
PER_TASK_METRICS_UP_TO = 50  # log each task's accuracy as its own metric for streams up to this long


@dataclass
class RunState:
    """What a run has computed so far: enough, with the model, to continue after the last finished task."""

    matrices: dict[str, np.ndarray]
    next_task: int = 0
    epoch_losses: list[float] = field(default_factory=list)

    @classmethod
    def fresh(cls, dataset: ContinualDataset) -> "RunState":
        return cls({s: empty_matrix(dataset.n_tasks) for s in settings_of(dataset)})


def matrix_csv(matrix: np.ndarray) -> str:
    """R[t][i] as CSV: one row per trained task t, one column per evaluated task i, empty where unmeasured."""
    out = io.StringIO()
    out.write("after_task," + ",".join(f"task_{i}" for i in range(matrix.shape[1])) + "\n")
    for t, row in enumerate(matrix):
        out.write(f"{t}," + ",".join("" if np.isnan(v) else f"{v:.4f}" for v in row) + "\n")
    return out.getvalue()


def train_task(model: ContinualModel, dataset: ContinualDataset, task: int, args: argparse.Namespace,
               logger: RunLogger, state: RunState) -> None:
    """All epochs of one task; the per-epoch mean loss is logged and checked for NaN."""
    model.train()
    model.begin_task(task)
    data = model.training_data(task)
    n, batch_size = len(data), args.batch_size
    steps = math.ceil(n / batch_size)
    for epoch in range(args.n_epochs):
        order = torch.randperm(n, device=data.labels.device)
        loss_sum = torch.zeros((), device=data.labels.device)
        bar = tqdm(range(steps), desc=f"task {task + 1}/{dataset.n_tasks} epoch {epoch + 1}/{args.n_epochs}",
                   disable=args.non_verbose, leave=False, dynamic_ncols=True)
        for step in bar:
            rows = order[step * batch_size:(step + 1) * batch_size]
            raw = data.images[rows]
            loss = model.observe(dataset.train_transform(raw), data.labels[rows], raw, data.indices[rows], task)
            loss_sum += loss * len(rows)
            if step % LOSS_REFRESH_STEPS == LOSS_REFRESH_STEPS - 1 or step == steps - 1:
                running = loss_sum.item() / min((step + 1) * batch_size, n)
                if not math.isfinite(running):
                    raise TrainingDiverged(
                        f"the training loss became {running} at task {task + 1}, epoch {epoch + 1}, step "
                        f"{step + 1}; lower --lr (now {args.lr}) or check the data; the tasks finished before "
                        f"this one stay logged")
                bar.set_postfix(loss=f"{running:.4f}")
        epoch_loss = loss_sum.item() / n
        state.epoch_losses.append(epoch_loss)
        logger.log_metrics({"train_loss": epoch_loss}, step=task * args.n_epochs + epoch)
    model.end_task(task)


def record_task(model: ContinualModel, dataset: ContinualDataset, task: int, logger: RunLogger,
                state: RunState) -> dict[str, float]:
    """Evaluate every seen task, fill row `task` of the accuracy matrices, and log it all."""
    accuracy = evaluate(model, dataset, task)
    metrics = {}
    for setting, values in accuracy.items():
        state.matrices[setting][task, : task + 1] = values
        if dataset.n_tasks <= PER_TASK_METRICS_UP_TO:
            metrics.update({f"acc_{setting}_task_{i}": v for i, v in enumerate(values)})
    metrics.update(summary_metrics(state.matrices, task))
    if dataset.mem_scores is not None:
        for bucket, values in accuracy_by_bucket(model, dataset, task, dataset.mem_scores,
                                                 model.args.bucket_thresholds).items():
            metrics.update({f"train_acc_{bucket}_task_{i}": v for i, v in enumerate(values) if np.isfinite(v)})
            if np.isfinite(values).any():
                metrics[f"train_acc_{bucket}"] = float(np.nanmean(values))
    record = model.task_record(task)
    metrics.update(record.get("metrics", {}))
    logger.log_metrics(metrics, step=task)
    for name, array in record.get("arrays", {}).items():
        logger.log_array(array, name)
    for name, (everything, kept) in record.get("histograms", {}).items():
        figure = value_histogram(everything, kept, f"memorization values after task {task + 1}")
        logger.log_figure(figure, name)
        close(figure)
    for setting, matrix in state.matrices.items():
        logger.log_text(matrix_csv(matrix), f"accuracy/{setting}.csv")
        figure = accuracy_heatmap(matrix, f"{setting.replace('_', '-')} accuracy (%)")
        logger.log_figure(figure, f"accuracy/{setting}.png")
        close(figure)
    state.next_task = task + 1
    return metrics


def train(model: ContinualModel, dataset: ContinualDataset, args: argparse.Namespace, logger: RunLogger,
          state: RunState, after_task: Callable[[RunState], None] | None = None) -> RunState:
    """Run the tasks from `state.next_task` to the end; `after_task` (e.g. a checkpoint) follows each."""
    for task in range(state.next_task, dataset.n_tasks):
        train_task(model, dataset, task, args, logger, state)
        metrics = record_task(model, dataset, task, logger, state)
        summary = "  ".join(f"{k} {v:.2f}" for k, v in metrics.items() if not k.split("_")[-1].isdigit())
        tqdm.write(f"task {task + 1}/{dataset.n_tasks}: {summary}")
        if after_task is not None:
            after_task(state)
    return state
