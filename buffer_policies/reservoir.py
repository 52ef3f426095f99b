"""reservoir: every stream example seen so far is in the buffer with the same probability."""
from __future__ import annotations

import torch

from buffer_policies import BufferPolicy, register_policy


@register_policy("reservoir")
class Reservoir(BufferPolicy):
    """Reservoir sampling (Vitter's algorithm R) for a whole batch at once."""

    def insert(self, buffer, labels):
        n_seen, capacity, device = buffer.n_seen, buffer.capacity, labels.device
        rows = torch.arange(len(labels), device=device)
        seen = n_seen + rows  # how many examples came before each row
        # Row j replaces a uniform slot in [0, seen_j] and is kept if that slot exists.
        draw = (torch.rand(len(labels), device=device, dtype=torch.float64) * (seen + 1)).long()
        slots = torch.where(seen < capacity, seen, draw)
        kept = slots < capacity
        slots, rows = slots[kept], rows[kept]
        # Several rows can draw one slot; sequential insertion would leave the last of them.
        unique_slots, owner = torch.unique(slots, return_inverse=True)
        last_row = torch.full_like(unique_slots, -1).scatter_reduce_(0, owner, rows, "amax")
        return unique_slots, last_row
