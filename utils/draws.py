"""The random draws that decide which examples a run sees when: the order of a task's stream and the rows
of a replay batch. Every caller reaches them through this module (`draws.stream_order(...)`), so a
harness can replace them as a whole: benchmarks/mammoth_draws.py swaps in Mammoth's generators to
compare the two programs run for run. The run itself always uses the functions below.
"""
from __future__ import annotations

import torch


def stream_order(n: int, device: torch.device | str, task: int, kind: str = "epoch") -> torch.Tensor:
    """A random order of a task's n training rows. `kind` says what it is for: "epoch", an epoch of the task
    loop; "pass", a method's own pass over the task's data; "batch", one batch drawn as a stream batch is
    (the caller keeps its first rows). The run draws all three alike; a harness may tell them apart."""
    return torch.randperm(n, device=device)


def replay_rows(n_stored: int, size: int, device: torch.device | str) -> torch.Tensor:
    """At most `size` distinct rows of n_stored stored examples, in random order: one replay batch."""
    return torch.randperm(n_stored, device=device)[:size]
