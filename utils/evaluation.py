"""Accuracy on every seen task from one forward pass, the accuracy matrix, and the metrics derived from it."""
from __future__ import annotations

import numpy as np
import torch

from utils.continual_dataset import ContinualDataset

EVAL_BATCH_SIZE = 512


def settings_of(dataset: ContinualDataset) -> list[str]:
    """The accuracy settings a dataset reports: class-IL and task-IL, or domain-IL alone."""
    return ["domain_il"] if dataset.SETTING == "domain-il" else ["class_il", "task_il"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: ContinualDataset, last_task: int) -> dict[str, np.ndarray]:
    """Test accuracy (%) on tasks 0..last_task after training task `last_task`, per setting.

    Class-IL predicts the argmax over all classes seen so far; task-IL the argmax within the
    task's own classes; both from the same logits.
    """
    was_training = model.training
    model.eval()
    n_seen = dataset.seen_classes(last_task)
    settings = settings_of(dataset)
    accuracy = {s: np.zeros(last_task + 1) for s in settings}
    for task in range(last_task + 1):
        split = dataset.test_split(task)
        classes = dataset.task_classes(task)
        correct = {s: torch.zeros((), dtype=torch.long, device=split.labels.device) for s in settings}
        for start in range(0, len(split), EVAL_BATCH_SIZE):
            images = dataset.test_transform(split.images[start:start + EVAL_BATCH_SIZE])
            labels = split.labels[start:start + EVAL_BATCH_SIZE]
            logits = model(images)
            seen_pred = logits[:, :n_seen].argmax(1)
            correct[settings[0]] += (seen_pred == labels).sum()
            if "task_il" in settings:
                task_pred = logits[:, classes.start:classes.stop].argmax(1) + classes.start
                correct["task_il"] += (task_pred == labels).sum()
        for s in settings:
            accuracy[s][task] = 100.0 * correct[s].item() / max(len(split), 1)
    model.train(was_training)
    return accuracy


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
        correct = torch.cat([model(dataset.test_transform(split.images[i:i + EVAL_BATCH_SIZE]))[:, :n_seen].argmax(1)
                             == split.labels[i:i + EVAL_BATCH_SIZE] for i in range(0, len(split), EVAL_BATCH_SIZE)])
        correct = correct.cpu().numpy()
        for b, name in enumerate(BUCKETS):
            if (bucket == b).any():
                out[name][task] = 100.0 * correct[bucket == b].mean()
    model.train(was_training)
    return out
