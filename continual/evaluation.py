"""Accuracy on every seen task from one forward pass, the accuracy matrix, and the metrics derived from it."""
from __future__ import annotations

import numpy as np
import torch

from datasets import ContinualDataset

EVAL_BATCH_SIZE = 512

# Metric keys. MLflow's UI groups keys into sections by what precedes their first "/"; keys without one, the
# headline metrics (acc_, forgetting_ and bwt_<setting>, terminal_test_acc and its _last_K means), come first.
# A task-level key is logged at step = the number of tasks trained, so task 1 is the first task.
TERMINAL_TEST = "terminal_test_acc"  # each task's test accuracy right after it was trained
TERMINAL_TRAIN = "train_acc/terminal"  # its training-split accuracy then
# SNR's summary of a long stream (Farias & Jozefiak): the mean terminal test accuracy of its last 10% of tasks,
# logged at the stream's end by runs of at least LONG_SUMMARY_FROM tasks (averaged over seeds by sweep reports).
LAST_TENTH = f"{TERMINAL_TEST}_last_10pct"
LONG_SUMMARY_FROM = 10


def last_tenth(terminal: np.ndarray, n_tasks: int) -> dict[str, float]:
    """{LAST_TENTH: mean of the last ceil(n_tasks / 10) terminal accuracies} once all n_tasks are done, for a
    stream of at least LONG_SUMMARY_FROM tasks; {} otherwise."""
    if n_tasks < LONG_SUMMARY_FROM or len(terminal) < n_tasks:
        return {}
    return {LAST_TENTH: float(np.mean(terminal[-int(np.ceil(n_tasks / 10)):]))}


def per_task_key(family: str, task: int) -> str:
    """The key of one task's value of a per-task family, in the family's own section, the task counted from 1:
    per_task_key("acc_class_il", 0) == "acc_class_il_per_task/task_1"."""
    return f"{family}_per_task/task_{task + 1}"


def is_per_task(key: str) -> bool:
    """Whether a key is one task's value of a per-task family (not a summary of the run so far)."""
    return "_per_task/" in key


def settings_of(dataset: ContinualDataset) -> list[str]:
    """The accuracy settings a dataset reports: class-IL and task-IL, or domain-IL alone."""
    return ["domain_il"] if dataset.SETTING == "domain-il" else ["class_il", "task_il"]


def task_aware(model: torch.nn.Module) -> bool:
    """Whether a model predicts only given the task of its inputs (TASK_AWARE = True on its class, as pnn): it is
    called as model(images, task) on the splits of one task."""
    return getattr(model, "TASK_AWARE", False)


def no_class_il(model: torch.nn.Module, dataset: ContinualDataset) -> bool:
    """A task-aware model on a class-IL dataset: told the task, its argmax over all seen classes would be a task-IL
    prediction, so its class-IL accuracy is 0, as Mammoth reports it for models without class-IL compatibility."""
    return task_aware(model) and dataset.SETTING == "class-il"


def split_logits(model: torch.nn.Module, images: torch.Tensor, task: int) -> torch.Tensor:
    """The model's logits on images of one task: model(images), or model(images, task) for a task-aware model."""
    return model(images, task) if task_aware(model) else model(images)


@torch.no_grad()
def split_accuracy(model: torch.nn.Module, dataset: ContinualDataset, split, task: int,
                   n_seen: int) -> dict[str, float]:
    """Accuracy (%) on one split of `task` per setting: argmax over the n_seen classes, and within the task's
    classes (task-IL)."""
    settings = settings_of(dataset)
    classes = dataset.task_classes(task)
    correct = {s: torch.zeros((), dtype=torch.long, device=split.labels.device) for s in settings}
    for start in range(0, len(split), EVAL_BATCH_SIZE):
        images = dataset.test_transform(split.images[start:start + EVAL_BATCH_SIZE])
        labels = split.labels[start:start + EVAL_BATCH_SIZE]
        logits = split_logits(model, images, task)
        if not no_class_il(model, dataset):
            correct[settings[0]] += (logits[:, :n_seen].argmax(1) == labels).sum()
        if "task_il" in settings:
            task_pred = logits[:, classes.start:classes.stop].argmax(1) + classes.start
            correct["task_il"] += (task_pred == labels).sum()
    return {s: 100.0 * correct[s].item() / max(len(split), 1) for s in settings}


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: ContinualDataset, last_task: int,
             tasks: list[int] | None = None) -> dict[str, np.ndarray]:
    """Test accuracy (%) on `tasks` (default 0..last_task) after training task `last_task`, per setting.

    Class-IL predicts the argmax over all classes seen so far; task-IL the argmax within the
    task's own classes; both from the same logits (a task-aware model's: see `task_aware`).
    """
    was_training = model.training
    model.eval()
    tasks = list(range(last_task + 1)) if tasks is None else tasks
    n_seen = dataset.seen_classes(last_task)
    accuracy = {s: np.zeros(len(tasks)) for s in settings_of(dataset)}
    for j, task in enumerate(tasks):
        values = split_accuracy(model, dataset, dataset.test_split(task), task, n_seen)
        for s, v in values.items():
            accuracy[s][j] = v
    model.train(was_training)
    return accuracy


@torch.no_grad()
def training_accuracy(model: torch.nn.Module, dataset: ContinualDataset, task: int) -> float:
    """Accuracy (%) on the task's own training split at the end of the task (eval mode, no augmentation),
    in the dataset's first setting (class-IL or domain-IL)."""
    was_training = model.training
    model.eval()
    values = split_accuracy(model, dataset, dataset.train_split(task), task, dataset.seen_classes(task))
    model.train(was_training)
    return values[settings_of(dataset)[0]]


def terminal_metrics(terminal: np.ndarray, name: str, windows: list[int]) -> dict[str, float]:
    """The newest task's terminal accuracy and, once K tasks are done, the mean over the last K, for each K of
    `windows` (the run's windows: see `windows`)."""
    metrics = {name: float(terminal[-1])}
    for k in windows:
        if len(terminal) >= k:
            metrics[f"{name}_last_{k}"] = float(np.mean(terminal[-k:]))
    return metrics


def windows(last_k: list[int], n_tasks: int) -> list[int]:
    """The K of --last_k that a run of `n_tasks` tasks logs a `_last_K` mean for: those below n_tasks (a mean
    over K of K or fewer tasks is the run's mean, or a partial window)."""
    return [k for k in dict.fromkeys(last_k) if k < n_tasks]


def empty_matrix(n_tasks: int) -> np.ndarray:
    """R[t][i], accuracy on task i after training task t; NaN where not (yet) measured."""
    return np.full((n_tasks, n_tasks), np.nan)


def average_accuracy(matrix: np.ndarray, t: int) -> float:
    """Mean accuracy over tasks 0..t after training task t."""
    return float(np.mean(matrix[t, : t + 1]))


def forgetting(matrix: np.ndarray, t: int) -> float:
    """Mean over i < t of the best earlier accuracy on task i minus its accuracy now; NaN at t = 0."""
    if t == 0:
        return float("nan")
    best_before = np.max(matrix[:t, :t], axis=0, initial=-np.inf, where=~np.isnan(matrix[:t, :t]))
    return float(np.mean(best_before - matrix[t, :t]))


def backward_transfer(matrix: np.ndarray, t: int) -> float:
    """Mean over i < t of the accuracy on task i now minus right after learning it; NaN at t = 0."""
    if t == 0:
        return float("nan")
    return float(np.mean(matrix[t, :t] - np.diag(matrix)[:t]))


def summary_metrics(matrices: dict[str, np.ndarray], t: int) -> dict[str, float]:
    """Average accuracy, forgetting and backward transfer after task t, per setting (NaN ones omitted)."""
    out = {}
    for setting, matrix in matrices.items():
        out[f"acc_{setting}"] = average_accuracy(matrix, t)
        if t > 0:
            out[f"forgetting_{setting}"] = forgetting(matrix, t)
            out[f"bwt_{setting}"] = backward_transfer(matrix, t)
    return out


def logged_summary_metrics(dataset: type[ContinualDataset], n_tasks: int, eval_scope: str,
                           last_k: list[int]) -> set[str]:
    """The run-summarizing metrics evaluate_task gives after the last task of an `n_tasks` run (what a sweep may
    select on)."""
    names = set()
    for name in (TERMINAL_TEST, TERMINAL_TRAIN):
        names |= {name, *(f"{name}_last_{k}" for k in windows(last_k, n_tasks))}
    if n_tasks >= LONG_SUMMARY_FROM:
        names.add(LAST_TENTH)
    if eval_scope == "seen":
        for setting in settings_of(dataset):
            names.add(f"acc_{setting}")
            if n_tasks > 1:  # forgetting and backward transfer need an earlier task
                names |= {f"forgetting_{setting}", f"bwt_{setting}"}
    return names


BUCKETS = ("low", "middle", "high")


def memorization_buckets(scores: np.ndarray, low: float, high: float) -> np.ndarray:
    """0 (score ≤ low), 1 (low < score ≤ high), 2 (score > high), −1 where the score is undefined."""
    bucket = np.full(len(scores), -1)
    finite = np.isfinite(scores)
    bucket[finite] = np.digitize(scores[finite], [low, high], right=True)
    return bucket


@torch.no_grad()
def accuracy_by_bucket(model: torch.nn.Module, dataset: ContinualDataset, last_task: int, scores: np.ndarray,
                       thresholds: tuple[float, float]) -> dict[str, np.ndarray]:
    """Class-IL accuracy (%) on the *training* examples of tasks 0..last_task, per memorization bucket.

    Forgetting is read per bucket from how these numbers fall over later tasks; NaN marks a bucket
    with no example in a task.
    """
    was_training = model.training
    model.eval()
    n_seen = dataset.seen_classes(last_task)
    out = {b: np.full(last_task + 1, np.nan) for b in BUCKETS}
    for task in range(last_task + 1):
        split = dataset.train_split(task)
        bucket = memorization_buckets(scores[split.indices.cpu().numpy()], *thresholds)
        correct = torch.cat([split_logits(model, dataset.test_transform(split.images[i:i + EVAL_BATCH_SIZE]), task)
                             [:, :n_seen].argmax(1) == split.labels[i:i + EVAL_BATCH_SIZE]
                             for i in range(0, len(split), EVAL_BATCH_SIZE)])
        correct = correct.cpu().numpy() & (not no_class_il(model, dataset))
        for b, name in enumerate(BUCKETS):
            if (bucket == b).any():
                out[name][task] = 100.0 * correct[bucket == b].mean()
    model.train(was_training)
    return out
