"""The replay buffer: uint8 examples, labels, logits, task ids and dataset indices on the training device."""
from __future__ import annotations

from typing import Callable

import torch

from buffer_policies import BufferPolicy

FIELDS = ("examples", "labels", "logits", "task_labels", "indices")


class Buffer:
    """Fixed-size store whose slots are chosen by a `BufferPolicy`; tensors are allocated on first insert."""

    def __init__(self, capacity: int, device: torch.device | str, policy: BufferPolicy):
        self.capacity = capacity
        self.device = torch.device(device)
        self.policy = policy
        self.n_seen = 0  # stream examples offered to the buffer so far
        self.examples = self.labels = self.logits = self.task_labels = self.indices = None

    def __len__(self) -> int:
        return min(self.n_seen, self.capacity)

    def is_empty(self) -> bool:
        return len(self) == 0

    def add_data(self, examples: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None = None,
                 task_labels: torch.Tensor | None = None, indices: torch.Tensor | None = None) -> None:
        """Offer a batch to the buffer; the policy decides which rows are stored where, in one vectorised write."""
        batch = {"examples": examples, "labels": labels, "logits": logits,
                 "task_labels": task_labels, "indices": indices}
        if self.examples is None:
            self._allocate(batch)
        slots, rows = self.policy.insert(self, labels)
        for name, value in batch.items():
            store = getattr(self, name)
            if store is not None and value is not None:
                store[slots] = value[rows].to(store.dtype)
        self.n_seen += len(labels)

    def get_data(self, size: int, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
        """A random batch (without replacement) of at most `size` stored examples, transformed if asked."""
        choice = torch.randperm(len(self), device=self.device)[: min(size, len(self))]
        out = {name: getattr(self, name)[choice] for name in FIELDS if getattr(self, name) is not None}
        if transform is not None:
            out["examples"] = transform(out["examples"])
        return out

    def get_all(self) -> dict[str, torch.Tensor]:
        """Every stored example, untransformed, in slot order."""
        return {name: getattr(self, name)[: len(self)] for name in FIELDS if getattr(self, name) is not None}

    def _allocate(self, batch: dict[str, torch.Tensor | None]) -> None:
        for name, value in batch.items():
            if value is not None:
                shape = (self.capacity, *value.shape[1:])
                setattr(self, name, torch.zeros(shape, dtype=value.dtype, device=self.device))

    def state_dict(self) -> dict:
        state = {"n_seen": self.n_seen, "policy": self.policy.state_dict()}
        state.update({name: getattr(self, name) for name in FIELDS if getattr(self, name) is not None})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.n_seen = int(state["n_seen"])
        self.policy.load_state_dict(state["policy"])
        for name in FIELDS:
            setattr(self, name, state[name].to(self.device) if name in state else None)
