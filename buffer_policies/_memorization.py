"""Shared machinery of the memorization policies (min, middle, max, 0.1min, 0.9max, randomized).

Each seen task owns buffer_size // tasks_seen slots (the remainder to the earliest tasks), split
evenly over its classes (remainder to the lowest classes). When task t begins, the earlier classes
shrink to their new quotas, keeping their examples in the policy's order, and the freed slots
become the current task's share. During the task the stream fills that share by reservoir
sampling, so replay works as in ER. When the task ends, the share is re-selected from all of the
task's training examples by the policy's rule over their memorization values, class by class.
Examples whose value is undefined (NaN) are never chosen while defined ones remain.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from buffer_policies import BufferPolicy
from buffer_policies.reservoir import reservoir_slots
from datasets import DATASETS
from utils.errors import ConfigError


def quotas(capacity: int, n_tasks_seen: int, classes_of_task: list[range]) -> dict[int, int]:
    """Slots per class: equal per task, then equal per class, remainders spread to the first ones."""
    per_class = {}
    for task, classes in enumerate(classes_of_task[:n_tasks_seen]):
        task_quota = capacity // n_tasks_seen + (1 if task < capacity % n_tasks_seen else 0)
        for position, c in enumerate(classes):
            per_class[c] = task_quota // len(classes) + (1 if position < task_quota % len(classes) else 0)
    return per_class


def _spread(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class MemorizationPolicy(BufferPolicy):
    """Base of the policies that select the buffer by memorization value; subclasses define `choose`."""

    NEEDS_MEMORIZATION_VALUES = True
    BOUNDS = {"longtail_fraction": "[0, 1]"}

    @staticmethod
    def add_args(parser):
        parser.add_argument("--longtail_fraction", type=float, default=0.0,
                            help="fraction of each class's quota reserved for its most memorized examples")

    @staticmethod
    def check_args(args):
        n_classes = DATASETS.get(args.dataset).N_CLASSES
        if args.buffer_size < n_classes:
            raise ConfigError(f"a buffer of {args.buffer_size} cannot keep one example of each of {args.dataset}'s "
                              f"{n_classes} classes; pass --buffer_size of at least {n_classes}")

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.generator = np.random.default_rng([args.seed, 8])
        self.start = 0  # slots [0, start) hold earlier tasks; the current task fills [start, capacity)

    def choose(self, values: np.ndarray, k: int) -> np.ndarray:
        """Positions of the k examples the policy keeps among `values` (all finite)."""
        raise NotImplementedError

    def insert(self, buffer, offered):
        labels = offered.labels
        slots, rows = reservoir_slots(buffer.n_seen - self.start, buffer.capacity - self.start, len(labels),
                                      labels.device)
        return slots + self.start, rows

    def rank(self, values: np.ndarray, k: int) -> np.ndarray:
        """Up to k positions: the long-tail share from the top, the rest by the policy; NaN values last."""
        finite = np.flatnonzero(np.isfinite(values))
        k_defined = min(k, len(finite))
        tail = int(round(self.args.longtail_fraction * k_defined))
        order = np.argsort(values[finite], kind="stable")
        top = finite[order[len(order) - tail:]] if tail else finite[:0]
        rest = np.setdiff1d(finite, top, assume_unique=True)
        chosen = np.concatenate([top, rest[self.choose(values[rest], k_defined - tail)]]).astype(np.int64)
        if len(chosen) < k:  # not enough defined values: fill with undefined ones, at random
            undefined = np.flatnonzero(~np.isfinite(values))
            chosen = np.concatenate([chosen, self.generator.permutation(undefined)[: k - len(chosen)]])
        return chosen

    def shrink(self, buffer, task: int, classes_of_task: list[range], values: np.ndarray) -> None:
        """Shrink the earlier classes to their quotas with `task` + 1 tasks; the rest becomes the task's share."""
        if task == 0 or buffer.labels is None:
            self.start = 0
            buffer.keep_first(0)
            return
        quota = quotas(buffer.capacity, task + 1, classes_of_task)
        stored = buffer.get_all()
        labels, indices = stored["labels"].cpu().numpy(), stored["indices"].cpu().numpy()
        keep = []
        for c in sorted(c for t in range(task) for c in classes_of_task[t]):
            slots = np.flatnonzero(labels == c)
            keep.append(slots[self.rank(values[indices[slots]], min(quota[c], len(slots)))])
        self.start = buffer.write_rows(0, stored, np.concatenate(keep))
        buffer.keep_first(self.start)

    def reselect(self, buffer, task: int, classes_of_task: list[range], candidates: dict[str, torch.Tensor],
                 values: np.ndarray) -> None:
        """Fill the task's share with the policy's choice among all the task's examples, class by class."""
        if buffer.labels is None:  # a model that offers no stream batches (agem) fills the buffer only here
            buffer.allocate(candidates)
        classes = list(classes_of_task[task])
        labels = candidates["labels"].cpu().numpy()
        indices = candidates["indices"].cpu().numpy()
        rows = []
        for c, k in zip(classes, _spread(buffer.capacity - self.start, len(classes))):
            members = np.flatnonzero(labels == c)
            rows.append(members[self.rank(values[indices[members]], min(k, len(members)))])
        buffer.keep_first(buffer.write_rows(self.start, candidates, np.concatenate(rows)))

