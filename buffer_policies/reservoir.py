"""reservoir: every stream example seen so far is in the buffer with the same probability."""
from __future__ import annotations

import torch

from buffer_policies import BufferPolicy, register_policy


def reservoir_slots(n_seen: int, capacity: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots in [0, capacity) for a batch after n_seen earlier examples, and the row that ends in each."""
    rows = torch.arange(batch, device=device)
    if n_seen + batch <= capacity:  # still filling: every row takes the next free slot, nothing to draw
        return rows + n_seen, rows
    seen = n_seen + rows  # how many examples came before each row
    # Row j replaces a uniform slot in [0, seen_j] and is kept if that slot exists.
    draw = (torch.rand(batch, device=device, dtype=torch.float64) * (seen + 1)).long()
    slots = torch.where(seen < capacity, seen, draw)
    kept = slots < capacity
    slots, rows = slots[kept], rows[kept]
    # Several rows can draw one slot; sequential insertion would leave the last of them.
    unique_slots, owner = torch.unique(slots, return_inverse=True)
    last_row = torch.full_like(unique_slots, -1).scatter_reduce_(0, owner, rows, "amax")
    return unique_slots, last_row


@register_policy("reservoir")
class Reservoir(BufferPolicy):
    """Reservoir sampling (Vitter's algorithm R) for a whole batch at once."""

    def insert(self, buffer, offered):
        labels = offered.labels
        return reservoir_slots(buffer.n_seen, buffer.capacity, len(labels), labels.device)
