"""class_balanced: class-balancing reservoir sampling (CBRS), equal per-class counts, uniform within each class."""
from __future__ import annotations

import weakref

import numpy as np
import torch

from buffer_policies import BufferPolicy, register_policy


@register_policy("class_balanced")
class ClassBalanced(BufferPolicy):
    """Class-balancing reservoir sampling (CBRS): A. Chrysakis and M.-F. Moens, "Online Continual Learning
    from Imbalanced Data", ICML 2020, Algorithm 1.

    Each stream example of class c, in stream order: while the buffer is not full it takes the next free
    slot. Once the buffer is full, a class is *full* if it is, or has been since then, one of the largest
    classes in the buffer (the paper's definition). An example of a class that is not full replaces a
    uniformly random stored example of one of the largest classes (ties broken at random); an example of
    a full class replaces a uniformly random stored example of its own class with probability m_c / n_c
    (m_c: class-c examples stored, n_c: class-c examples seen so far, this one included) and is
    discarded otherwise. Per-class counts end equal (±1) except for classes with fewer stream examples
    than their share, which keep all of theirs, and each class's stored examples are a uniform sample of
    that class's stream.

    Rows of a batch depend on each other, so they are decided one by one on the host, in O(1) each, from
    bookkeeping kept here: per-class stored/seen counts, the slots of each class, the largest classes.
    The buffer's labels are re-read only when something other than `Buffer.add_data` changed them
    (a checkpoint restore, a rebuild of the buffer), detected through the labels tensor's version counter.
    """

    def __init__(self, args):
        super().__init__(args)
        self._reset(0)

    def _reset(self, capacity: int) -> None:
        self._capacity = capacity
        self._filled = 0  # slots 0.._filled-1 hold examples
        self._seen: list[int] = []  # per class: stream examples seen (n_c)
        self._count: list[int] = []  # per class: examples stored (m_c)
        self._full: list[bool] = []  # per class: is or has been a largest class since the buffer filled
        self._members: list[list[int]] = []  # per class: its slots, in no particular order
        self._slot_class = [-1] * capacity
        self._slot_pos = [0] * capacity  # slot s is _members[_slot_class[s]][_slot_pos[s]]
        self._max = 0  # the largest class count
        self._largest: list[int] = []  # the classes with _max stored examples
        self._labels_ref = None  # the buffer's labels tensor and its version right after our last insert
        self._labels_version = -1

    def _add_classes(self, n_classes: int) -> None:
        extra = n_classes - len(self._seen)
        if extra > 0:
            self._seen += [0] * extra
            self._count += [0] * extra
            self._full += [False] * extra
            self._members += [[] for _ in range(extra)]

    # ---------------------------------------------------------------- insertion

    def insert(self, buffer, offered):
        labels = offered.labels
        if buffer.capacity == 0:
            empty = torch.zeros(0, dtype=torch.long, device=labels.device)
            return empty, empty.clone()
        host = labels.detach().to("cpu", torch.long).numpy()  # the one device-to-host copy of the batch
        if self._capacity == 0:
            self._reset(buffer.capacity)
        elif self._capacity != buffer.capacity:
            raise ValueError(f"class_balanced policy kept a buffer of {self._capacity} slots, "
                             f"now asked to fill one of {buffer.capacity}")
        self._check_buffer(buffer)
        if len(host):
            if host.min() < 0:
                raise ValueError(f"class_balanced needs non-negative class labels, got {int(host.min())}")
            self._add_classes(int(host.max()) + 1)
        draws = torch.rand(len(host), dtype=torch.float64).tolist()  # one uniform per row, CPU generator
        owner: dict[int, int] = {}  # slot -> the last row of the batch written there
        capacity, seen, count, full, members = self._capacity, self._seen, self._count, self._full, self._members
        for row, (c, u) in enumerate(zip(host.tolist(), draws)):
            seen[c] += 1
            if self._filled < capacity:
                slot = self._filled
                self._filled += 1
                self._store(c, slot)
                if self._filled == capacity:
                    for k in self._largest:
                        full[k] = True
            elif not full[c]:
                slot = self._evict_from_largest(u)
                self._store(c, slot)
                self._settle_largest()
            else:
                j = min(int(u * seen[c]), seen[c] - 1)  # uniform in [0, n_c): kept with probability m_c / n_c
                if j >= count[c]:
                    continue
                slot = members[c][j]  # uniform among the class's stored examples
            owner[slot] = row
        if buffer.labels is not None:
            self._labels_ref, self._labels_version = weakref.ref(buffer.labels), buffer.labels._version
        slots = sorted(owner)
        device = labels.device
        return (torch.tensor(slots, dtype=torch.long, device=device),
                torch.tensor([owner[s] for s in slots], dtype=torch.long, device=device))

    def _store(self, c: int, slot: int) -> None:
        """Record class c in the (empty or just vacated) slot and update the largest classes."""
        members = self._members[c]
        self._slot_class[slot], self._slot_pos[slot] = c, len(members)
        members.append(slot)
        self._count[c] += 1
        if self._count[c] > self._max:
            self._max, self._largest = self._count[c], [c]
        elif self._count[c] == self._max:
            self._largest.append(c)
            if self._filled == self._capacity:
                self._full[c] = True

    def _evict_from_largest(self, u: float) -> int:
        """Vacate a uniformly random slot among those of the largest classes (a random largest class, then a
        random slot of it: they all hold _max examples); returns the slot."""
        m = self._max
        k = min(int(u * len(self._largest) * m), len(self._largest) * m - 1)
        victim, j = self._largest[k // m], k % m
        members = self._members[victim]
        slot, last = members[j], members.pop()
        if last != slot:
            members[j], self._slot_pos[last] = last, j
        self._count[victim] -= 1
        self._largest.remove(victim)  # may leave it empty until the newcomer is stored: see _settle_largest
        return slot

    def _settle_largest(self) -> None:
        """After an eviction and a store: if no class is left at the old maximum, the maximum dropped by one.
        O(classes), at most once per that many evictions."""
        if not self._largest:
            self._max -= 1
            self._largest = [k for k, n in enumerate(self._count) if n == self._max]
            for k in self._largest:
                self._full[k] = True

    # ------------------------------------------------------ staying in step with the buffer

    def _check_buffer(self, buffer) -> None:
        """Re-read the buffer's labels if they changed other than by the write that followed our last insert."""
        stored = buffer.labels
        if (len(buffer) == self._filled and stored is not None and self._labels_ref is not None
                and self._labels_ref() is stored and stored._version == self._labels_version + 1):
            return
        if len(buffer) == self._filled == 0:
            return
        if len(buffer) == self._filled and stored is not None:
            host = stored[: self._filled].to("cpu", torch.long).numpy()
            if np.array_equal(host, np.asarray(self._slot_class[: self._filled])):
                return  # e.g. a buffer and this policy restored from one checkpoint
        self.sync(buffer)

    def sync(self, buffer) -> None:
        """Rebuild the per-slot bookkeeping from the labels stored in `buffer` (after something other than
        this policy's inserts rewrote it). Stream counts are kept (n_c raised to m_c),
        and so are full classes still within one of the maximum."""
        if self._capacity != buffer.capacity:
            self._reset(buffer.capacity)
        n = len(buffer)
        stored = (buffer.labels[:n].to("cpu", torch.long).numpy() if n and buffer.labels is not None
                  else np.zeros(0, dtype=np.int64))
        self._filled = len(stored)
        if len(stored):
            self._add_classes(int(stored.max()) + 1)
        self._slot_class = stored.tolist() + [-1] * (self._capacity - len(stored))
        self._slot_pos = [0] * self._capacity
        self._members = [[] for _ in self._seen]
        for slot, c in enumerate(stored.tolist()):
            self._slot_pos[slot] = len(self._members[c])
            self._members[c].append(slot)
        self._count = [len(m) for m in self._members]
        self._seen = [max(s, m) for s, m in zip(self._seen, self._count)]
        self._max = max(self._count, default=0)
        self._largest = [c for c, m in enumerate(self._count) if m == self._max] if self._max else []
        # Full classes must hold _max or _max - 1 examples (what the inserts maintain); any further below
        # the maximum after the rewrite, a class may take slots from the largest ones again.
        self._full = [f and m >= self._max - 1 for f, m in zip(self._full, self._count)]
        if self._filled == self._capacity:
            for c in self._largest:
                self._full[c] = True
        self._labels_ref, self._labels_version = None, -1

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Plain tensors, ints and lists (loadable with torch.load(weights_only=True))."""
        return {
            "capacity": self._capacity,
            "seen": torch.tensor(self._seen, dtype=torch.long),
            "full": torch.tensor(self._full, dtype=torch.bool),
            "slot_class": torch.tensor(self._slot_class[: self._filled], dtype=torch.long),
            "slot_pos": torch.tensor(self._slot_pos[: self._filled], dtype=torch.long),
            "max_count": self._max,
            "largest": list(self._largest),
        }

    def load_state_dict(self, state: dict) -> None:
        self._reset(int(state["capacity"]))
        seen = state["seen"].tolist()
        self._add_classes(len(seen))
        self._seen = seen
        self._full = [bool(f) for f in state["full"].tolist()]
        slot_class, slot_pos = state["slot_class"].tolist(), state["slot_pos"].tolist()
        self._filled = len(slot_class)
        self._slot_class[: self._filled], self._slot_pos[: self._filled] = slot_class, slot_pos
        self._count = [0] * len(seen)
        for c in slot_class:
            self._count[c] += 1
        self._members = [[0] * m for m in self._count]
        for slot, (c, j) in enumerate(zip(slot_class, slot_pos)):
            self._members[c][j] = slot
        self._max = int(state["max_count"])
        self._largest = [int(c) for c in state["largest"]]
