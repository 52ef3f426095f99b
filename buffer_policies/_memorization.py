"""Shared machinery of the memorization policies (min, middle, max, 0.1min, 0.9max, randomized).

During a task the buffer fills like ER's (class-balanced reservoir). At the end of task t the
buffer is rebuilt: each seen task gets buffer_size // (t + 1) slots (the remainder to the earliest
tasks), split evenly over its classes (remainder to the lowest classes); the current task's
classes are chosen from all of the task's training examples by the policy's rule over their
memorization values; earlier classes shrink to their new quota, keeping their examples in the
policy's order. Examples whose value is undefined (NaN) are never chosen while defined ones remain.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from buffer_policies import BUFFER_POLICIES, BufferPolicy
from utils.errors import ConfigError


def quotas(capacity: int, n_tasks_seen: int, classes_of_task: list[range]) -> dict[int, int]:
    """Slots per class after a task: equal per task, then equal per class, remainders spread to the first ones."""
    per_class = {}
    for task, classes in enumerate(classes_of_task[:n_tasks_seen]):
        task_quota = capacity // n_tasks_seen + (1 if task < capacity % n_tasks_seen else 0)
        for position, c in enumerate(classes):
            per_class[c] = task_quota // len(classes) + (1 if position < task_quota % len(classes) else 0)
    return per_class


class MemorizationPolicy(BufferPolicy):
    """Base of the policies that re-select the buffer by memorization value at the end of each task."""

    @staticmethod
    def add_args(parser):
        parser.add_argument("--longtail_fraction", type=float, default=0.0,
                            help="fraction of each class's quota reserved for its most memorized examples")

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        if not 0.0 <= args.longtail_fraction <= 1.0:
            raise ConfigError(f"--longtail_fraction is a fraction in [0, 1], got {args.longtail_fraction}")
        self.filling = BUFFER_POLICIES.get("class_balanced")(args)
        self.generator = np.random.default_rng([args.seed, 8])

    def insert(self, buffer, labels):
        return self.filling.insert(buffer, labels)

    def state_dict(self) -> dict:
        return {"filling": self.filling.state_dict(), "generator": self.generator.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.filling.load_state_dict(state["filling"])
        self.generator.bit_generator.state = state["generator"]

    def choose(self, values: np.ndarray, k: int) -> np.ndarray:
        """Positions of the k examples the policy keeps among `values` (all finite)."""
        raise NotImplementedError

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

    def rebuild(self, buffer, task: int, classes_of_task: list[range], candidates: dict[str, torch.Tensor],
                values: np.ndarray) -> dict[str, np.ndarray]:
        """Re-select the buffer after `task`; `candidates` holds the task's examples (images, labels, indices,
        logits); `values` is indexed by dataset index. Returns what was kept, for logging."""
        quota = quotas(buffer.capacity, task + 1, classes_of_task)
        current = set(classes_of_task[task])
        stored = buffer.get_all()
        stored_labels = stored["labels"].cpu().numpy() if stored else np.zeros(0, dtype=np.int64)
        stored_indices = stored["indices"].cpu().numpy() if stored else np.zeros(0, dtype=np.int64)
        parts = []  # (source, rows): source 'buffer' rows are slots, 'task' rows index the candidates
        spare = 0
        for c in sorted(c for c in quota if c not in current):
            slots = np.flatnonzero(stored_labels == c)
            keep = slots[self.rank(values[stored_indices[slots]], min(quota[c], len(slots)))]
            spare += quota[c] - len(keep)
            parts.append(("buffer", keep))
        task_labels = candidates["labels"].cpu().numpy()
        task_indices = candidates["indices"].cpu().numpy()
        current_classes = sorted(current)
        for position, c in enumerate(current_classes):
            # Slots old classes could not fill go to the current task's classes, so the buffer stays full.
            extra = spare // len(current_classes) + (1 if position < spare % len(current_classes) else 0)
            rows = np.flatnonzero(task_labels == c)
            parts.append(("task", rows[self.rank(values[task_indices[rows]], min(quota[c] + extra, len(rows)))]))
        self._write(buffer, stored, candidates, parts)
        self.filling.sync(buffer)  # the filling policy's per-class bookkeeping follows the new contents
        kept = buffer.get_all()
        return {"indices": kept["indices"].cpu().numpy(), "labels": kept["labels"].cpu().numpy()}

    @staticmethod
    def _write(buffer, stored: dict, candidates: dict, parts: list[tuple[str, np.ndarray]]) -> None:
        fields = {}
        for name in ("examples", "labels", "logits", "task_labels", "indices"):
            if getattr(buffer, name) is None:
                continue
            pieces = []
            for source, rows in parts:
                table = stored if source == "buffer" else candidates
                pieces.append(table[name][torch.as_tensor(rows, device=table[name].device)])
            fields[name] = torch.cat(pieces)
        n = len(fields["labels"])
        for name, value in fields.items():
            getattr(buffer, name)[:n] = value.to(buffer.device)
        # The buffer now holds n examples in slots 0..n-1; reservoir counting continues from there.
        buffer.n_seen = max(buffer.n_seen, n) if n == buffer.capacity else n
