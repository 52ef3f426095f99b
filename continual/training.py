"""The task loop: train each task, evaluate every seen task, tell the records, checkpoint.

The loop owns the optimizer step and the events: a model's `observe` returns the loss of a batch,
and the model's `Lifecycle` (models/__init__.py) runs backward, every component's `after_backward`,
the step and every `after_step`, and sends `begin_task`, `end_task` and `end_run`, so no component
can be left out. What a run logs (MLflow metrics, artifacts, figures) is not done here: the loop
tells a `RunRecords` (continual/records.py) what happened, and it writes the record.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from continual.evaluation import (
    TERMINAL_TEST,
    TERMINAL_TRAIN,
    accuracy_by_bucket,
    empty_matrix,
    evaluate,
    is_per_task,
    last_tenth,
    per_task_key,
    settings_of,
    summary_metrics,
    terminal_metrics,
    training_accuracy,
    windows,
)
from continual.forgetting import StreamRecorder
from continual.records import RunRecords
from datasets import ContinualDataset
from models import ContinualModel
from utils import draws
from utils.errors import TrainingDiverged

LOSS_REFRESH_STEPS = 20  # read the loss back from the device this often (progress bar and NaN check)
PER_TASK_METRICS_UP_TO = 50  # log each task's accuracy as its own metric for streams up to this long


@dataclass
class RunState:
    """What a run has computed so far: enough, with the model, to continue after the last finished task."""

    matrices: dict[str, np.ndarray]
    next_task: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    history: dict[str, list[float]] = field(default_factory=dict)  # per-task scalars, for the figures
    forgetting: StreamRecorder | None = None  # --forgetting_events (checkpointed by continual/run.py)

    def terminal_accuracy(self, setting: str) -> np.ndarray:
        """Test accuracy of each finished task right after it was trained, before any further update."""
        return np.diag(self.matrices[setting])[: self.next_task]

    @classmethod
    def fresh(cls, dataset: ContinualDataset) -> "RunState":
        return cls({s: empty_matrix(dataset.n_tasks) for s in settings_of(dataset)})


def train_task(model: ContinualModel, dataset: ContinualDataset, task: int, args: argparse.Namespace,
               records: RunRecords, state: RunState) -> None:
    """All epochs of one task; the per-epoch mean loss is recorded and checked for NaN."""
    model.train()
    lifecycle = model.lifecycle
    lifecycle.begin_task(task)
    data = model.training_data(task)
    probe, probe_labels = data.images[: args.probe_size], data.labels[: args.probe_size]
    n, batch_size = len(data), args.batch_size
    steps = math.ceil(n / batch_size)
    observe = lifecycle.observe if state.forgetting is None else functools.partial(state.forgetting.observe, model.net, lifecycle.observe)
    for epoch in range(args.n_epochs):
        order = draws.stream_order(n, data.labels.device, task)
        loss_sum = torch.zeros((), device=data.labels.device)
        n_stepped = 0  # examples of the batches that made an optimizer step
        bar = tqdm(range(steps), desc=f"task {task + 1}/{dataset.n_tasks} epoch {epoch + 1}/{args.n_epochs}",
                   disable=args.non_verbose or not sys.stderr.isatty(), leave=False, dynamic_ncols=True)
        for step in bar:
            rows = order[step * batch_size:(step + 1) * batch_size]
            raw = data.images[rows]
            loss = observe(dataset.train_transform(raw), data.labels[rows], raw, data.indices[rows], task)
            if loss is not None:  # None: the batch only fed the model's memory
                lifecycle.step(loss)
                loss_sum += loss.detach() * len(rows)
                n_stepped += len(rows)
                if args.log_every and model.plasticity.step % args.log_every == 0:
                    covariates = measure_covariates(model, probe, probe_labels, args)
                    records.step_measured(model.plasticity.step, covariates)
            if n_stepped and (step % LOSS_REFRESH_STEPS == LOSS_REFRESH_STEPS - 1 or step == steps - 1):
                running = loss_sum.item() / n_stepped
                if not math.isfinite(running):
                    raise TrainingDiverged(
                        f"the training loss became {running} at task {task + 1}, epoch {epoch + 1}, step "
                        f"{step + 1}; lower --lr (now {args.lr}) or check the data; the tasks finished before "
                        f"this one stay logged")
                bar.set_postfix(loss=f"{running:.4f}")
        state.epoch_losses.append(loss_sum.item() / n_stepped if n_stepped else math.nan)
    records.task_trained(task, state.epoch_losses[-args.n_epochs:])
    if state.forgetting is not None:
        state.forgetting.detach()  # before end_task, where methods copy the network
    lifecycle.end_task(task)


def measure_covariates(model: ContinualModel, images: torch.Tensor, labels: torch.Tensor,
                       args: argparse.Namespace) -> dict[str, float]:
    """The plasticity covariates now: probe statistics, weight magnitudes, the gradient norm on the probe,
    the distance from initialisation and neuron ages."""
    from continual.covariates import (
        age_statistics,
        distance_from_init,
        gradient_norm,
        probe_statistics,
        weight_magnitudes,
    )

    inputs = model.dataset.test_transform(images)
    metrics = probe_statistics(model.net, inputs, args.dormant_tau)
    metrics.update(weight_magnitudes(model.net))
    metrics["grad_norm"] = gradient_norm(model.net, inputs, labels)
    metrics.update(distance_from_init(model.net, model.plasticity.initial))
    for unit in ("steps", "tokens"):
        metrics.update(age_statistics(model.plasticity.units.monitor.ages(unit), unit))
    return metrics


def append_history(history: dict[str, list[float]], metrics: dict[str, float], task: int) -> None:
    """Add the task's scalars (not one task's value of a per-task family) to the history, NaN-padding keys that
    start late."""
    for key, value in metrics.items():
        if is_per_task(key):
            continue
        values = history.setdefault(key, [])
        values.extend([float("nan")] * (task - len(values)))
        values.append(value)


def evaluate_task(model: ContinualModel, dataset: ContinualDataset, task: int,
                  state: RunState) -> tuple[dict[str, float], dict]:
    """Evaluate the seen tasks (or only this one) and fill the accuracy matrices; returns the task's metrics
    and the model's record (arrays, histograms) for the listeners."""
    args = model.args
    tasks = list(range(task + 1)) if args.eval_scope == "seen" else [task]
    accuracy = evaluate(model, dataset, task, tasks)
    metrics = {}
    for setting, values in accuracy.items():
        state.matrices[setting][task, tasks] = values
        if dataset.n_tasks <= PER_TASK_METRICS_UP_TO:
            metrics.update({per_task_key(f"acc_{setting}", i): v for i, v in zip(tasks, values)})
    if args.eval_scope == "seen":
        metrics.update(summary_metrics(state.matrices, task))
    state.next_task = task + 1
    main_setting = settings_of(dataset)[0]
    train_accuracy = state.history.get(TERMINAL_TRAIN, [])[:task] + [training_accuracy(model, dataset, task)]
    logged_windows = windows(args.last_k, dataset.n_tasks)
    metrics.update(terminal_metrics(state.terminal_accuracy(main_setting), TERMINAL_TEST, logged_windows))
    metrics.update(last_tenth(state.terminal_accuracy(main_setting), dataset.n_tasks))
    metrics.update(terminal_metrics(np.array(train_accuracy), TERMINAL_TRAIN, logged_windows))
    if dataset.mem_scores is not None:
        for bucket, values in accuracy_by_bucket(model, dataset, task, dataset.mem_scores,
                                                 args.bucket_thresholds).items():
            metrics.update({per_task_key(f"train_acc_{bucket}", i): v for i, v in enumerate(values)
                            if np.isfinite(v)})
            if np.isfinite(values).any():
                metrics[f"train_acc/{bucket}"] = float(np.nanmean(values))
    # Each component's numbers in a section of its own: the plasticity methods', the covariates', the model's.
    metrics.update({f"plasticity/{k}": v for k, v in model.plasticity.task_metrics(task).items()})
    if args.covariates:
        split = dataset.train_split(task)
        covariates = measure_covariates(model, split.images[: args.probe_size], split.labels[: args.probe_size], args)
        metrics.update({f"covariates/{k}": v for k, v in covariates.items()})
    record = model.task_record(task)
    metrics.update({f"model/{k}": v for k, v in record.get("metrics", {}).items()})
    append_history(state.history, metrics, task)
    return metrics, record


def on_console(key: str) -> bool:
    """Whether the line printed after each task shows a metric: the headline accuracies, forgetting and terminal
    test accuracy (not backward transfer nor the _last_K means), the terminal training accuracy, the resets
    and the dormant units."""
    if key in (TERMINAL_TRAIN, "plasticity/resets", "covariates/dormant_frac"):
        return True
    return "/" not in key and key.startswith(("acc_", "forgetting_", TERMINAL_TEST)) and "_last_" not in key


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


def train(model: ContinualModel, dataset: ContinualDataset, args: argparse.Namespace, records: RunRecords,
          state: RunState, after_task: Callable[[RunState], None] | None = None) -> RunState:
    """Run the tasks from `state.next_task` to the end; `records` hears each task's results, `after_task`
    (e.g. a checkpoint) follows each."""
    started, first = time.perf_counter(), state.next_task
    for task in range(state.next_task, dataset.n_tasks):
        train_task(model, dataset, task, args, records, state)
        metrics, record = evaluate_task(model, dataset, task, state)
        records.task_evaluated(model, dataset, task, metrics, record, state)
        summary = "  ".join(f"{k} {v:.2f}" for k, v in metrics.items() if on_console(k))
        elapsed = time.perf_counter() - started
        eta = elapsed / (task + 1 - first) * (dataset.n_tasks - task - 1)
        tqdm.write(f"task {task + 1}/{dataset.n_tasks} [{_clock(elapsed)} elapsed, {_clock(eta)} left]: {summary}")
        if after_task is not None:
            after_task(state)
    if state.next_task == dataset.n_tasks:
        model.lifecycle.end_run()
    return state
