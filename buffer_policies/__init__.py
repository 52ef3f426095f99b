"""Replay buffers and the policies deciding what they keep, registered by CLI name (`reservoir`, `min`, ...).

The contract lives here: the `Buffer` stores uint8 examples, labels, logits, task ids and dataset
indices on the training device, and a `BufferPolicy` chooses the slots each incoming batch
overwrites. A new policy is one file: subclass `BufferPolicy`, implement `insert`, and decorate it
with `@register_policy("name")`; a policy that re-selects the whole buffer (as the memorization
policies do at the end of a task) rewrites it through `Buffer.write_rows` and `Buffer.keep_first`.

A policy is a `Hooks` component: it receives the run's events (`begin_task`, `after_step` with the
stream batch, `end_task`, ...) like the model and the plasticity methods, and `insert` sees the rows
offered with their dataset indices and, on demand, the network's logits and per-example loss on them.
Whatever a policy keeps in its attributes is saved in checkpoints without code of its own
(`utils/state.py`); `self.buffer` is the buffer it serves.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from utils import draws
from utils.lifecycle import Hooks, Offered
from utils.registry import Registry
from utils.state import capture, restore


class BufferPolicy(Hooks):
    """Chooses the buffer slots that incoming stream examples overwrite.

    `insert` returns (slots, rows): buffer slot slots[k] receives offered row rows[k]; slots are
    unique. Slots fill front to back (0, 1, 2, ...) until the buffer is full.
    """

    NAME: str
    NEEDS_MEMORIZATION_VALUES = False  # True: selects by the model's memorization_values()
    REFERENCES = ("args", "buffer")  # rebuilt by the framework, not checkpointed

    @staticmethod
    def add_args(parser: argparse._ArgumentGroup) -> None:
        """Policy-specific flags (none by default)."""

    @staticmethod
    def check_args(args: argparse.Namespace) -> None:
        """Refuse, with one sentence (ConfigError), values a range cannot express (conditions across flags, limits
        that depend on the dataset); a flag's own range is declared in BOUNDS and checked before this."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.buffer: Buffer | None = None  # set by the buffer this policy serves

    def state_dict(self) -> dict:
        """Everything the policy holds (its attributes, see utils/state.py)."""
        return capture(self)

    def load_state_dict(self, state: dict) -> None:
        restore(self, state, self.buffer.device if self.buffer is not None else "cpu")

    def insert(self, buffer: "Buffer", offered: Offered) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots for the offered rows (`offered.labels`, `.indices`, `.examples`, and on demand `.logits`,
        `.loss`); the buffer's fields are readable, not yet updated."""
        raise NotImplementedError


FIELDS = ("examples", "labels", "logits", "task_labels", "indices")


class Buffer:
    """Fixed-size store whose slots are chosen by a `BufferPolicy`; tensors are allocated on first insert."""

    def __init__(self, capacity: int, device: torch.device | str, policy: BufferPolicy,
                 scorer: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.capacity = capacity
        self.device = torch.device(device)
        self.policy = policy
        policy.buffer = self
        self.scorer = scorer  # logits of the network on uint8 examples, for policies that rank by them
        self.n_seen = 0  # stream examples offered to the buffer so far
        self.examples = self.labels = self.logits = self.task_labels = self.indices = None

    def __len__(self) -> int:
        # Not min(): once the registry imports this package's policy files, `min` and `max` here name them.
        return self.n_seen if self.n_seen < self.capacity else self.capacity

    def is_empty(self) -> bool:
        return len(self) == 0

    def add_data(self, examples: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None = None,
                 task_labels: torch.Tensor | None = None, indices: torch.Tensor | None = None) -> None:
        """Offer a batch to the buffer; the policy decides which rows are stored where, in one vectorised write."""
        batch = {"examples": examples, "labels": labels, "logits": logits,
                 "task_labels": task_labels, "indices": indices}
        if self.examples is None:
            self.allocate(batch)
        slots, rows = self.policy.insert(self, Offered(examples, labels, indices, self.scorer))
        if len(slots) > self.capacity or (len(slots) and int(slots.max()) >= self.capacity):
            raise RuntimeError(f"buffer policy {self.policy.NAME} chose slots beyond the buffer's {self.capacity}; "
                               f"insert must return slots in [0, capacity)")
        for name, value in batch.items():
            store = getattr(self, name)
            if store is not None and value is not None:
                store[slots] = value[rows].to(store.dtype)
        self.n_seen += len(labels)

    def get_data(self, size: int, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
        """A random batch (without replacement) of at most `size` stored examples, transformed if asked."""
        choice = draws.replay_rows(len(self), size, self.device)
        out = {name: getattr(self, name)[choice] for name in FIELDS if getattr(self, name) is not None}
        if transform is not None:
            out["examples"] = transform(out["examples"])
        return out

    def get_all(self) -> dict[str, torch.Tensor]:
        """Every stored example, untransformed, in slot order."""
        return {name: getattr(self, name)[: len(self)] for name in FIELDS if getattr(self, name) is not None}

    def write_rows(self, offset: int, source: dict[str, torch.Tensor], rows) -> int:
        """Write source[name][rows] into consecutive slots from `offset`, for every stored field that
        `source` has; returns the first slot after them. Used by policies that re-select the buffer."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        for name in FIELDS:
            store = getattr(self, name)
            if store is not None and name in source:
                values = source[name][rows.to(source[name].device)]
                store[offset:offset + len(rows)] = values.to(store.device, store.dtype)
        return offset + len(rows)

    def keep_first(self, n: int) -> None:
        """The buffer now holds exactly slots [0, n); the next stream example counts as the (n + 1)-th."""
        self.n_seen = n

    def allocate(self, batch: dict[str, torch.Tensor | None]) -> None:
        """Allocate, at the buffer's capacity, a zero store for every field of `batch` (on the first insert,
        or before a policy writes rows into a buffer that was never offered a batch)."""
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


BUFFER_POLICIES: Registry[BufferPolicy] = Registry("buffer policy", "buffer_policies", plural="buffer policies")
register_policy = BUFFER_POLICIES.register
