"""This program run with Mammoth's random draws, so the two can be compared run for run.

    .venv/bin/python benchmarks/mammoth_draws.py --model er --dataset seq-mnist ... (main.py's flags)

Not the product's path: it replaces the three functions through which every draw of a run goes
(`utils.draws.stream_order`, `utils.draws.replay_rows`, and the reservoir policy's slots) by the draws
Mammoth's code makes (aimagelab/mammoth at e75a491), then runs main.py:

- Stream order (`utils/conf.py: create_seeded_dataloader`, `shuffle=True`): each task's DataLoader owns
  a fresh `torch.Generator` seeded with --seed. Every iterator over it draws one int64 (its base seed);
  its sampler then draws `torch.randperm(n)` of the task's rows, and one more `randperm(n)` when a pass
  runs to its end (RandomSampler's remainder). Before the first epoch the training loop's progress bar
  (`tqdm(train_loader)`, `utils/training.py`) opens one iterator it never reads: one int64 more. A
  method's own passes over the loader in `begin_task` (lwf's warm-up) come before that bar.
- Reservoir (`utils/buffer.py: reservoir`): example by example, slot = seen while the buffer fills,
  else `np.random.randint(0, seen + 1)`, kept if below the capacity.
- Replay batch (`Buffer.get_data`): `np.random.choice(min(seen, capacity), size, replace=False)`.
- numpy's global generator is seeded with --seed once, before the run, as Mammoth's main does.

Everything else (initial weights, augmentation, the methods' own draws) is each program's own.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from buffer_policies import reservoir  # noqa: E402
from utils import draws  # noqa: E402


class MammothDraws:
    """The draws of Mammoth's loaders and buffer, with the state they keep between calls."""

    def __init__(self, seed: int):
        self.seed = seed
        self.task = None
        self.generator = None
        np.random.seed(seed)

    def base_seed(self) -> None:
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)

    def stream_order(self, n: int, device, task: int, kind: str = "epoch") -> torch.Tensor:
        if task != self.task:  # a new task: Mammoth builds its loaders, with a freshly seeded generator
            self.task, self.generator, self.epochs = task, torch.Generator().manual_seed(self.seed), 0
        if kind == "epoch":
            if self.epochs == 0:
                self.base_seed()  # the progress bar's iterator
            self.epochs += 1
        self.base_seed()
        order = torch.randperm(n, generator=self.generator)
        if kind != "batch":
            torch.randperm(n, generator=self.generator)  # the sampler's remainder at the end of the pass
        return order.to(device)

    @staticmethod
    def replay_rows(n_stored: int, size: int, device) -> torch.Tensor:
        choice = np.random.choice(n_stored, size=min(size, n_stored), replace=False)
        return torch.as_tensor(choice, dtype=torch.long, device=device)

    @staticmethod
    def reservoir_slots(n_seen: int, capacity: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        owner: dict[int, int] = {}  # slot -> the last row written there, as sequential insertion leaves it
        for row in range(batch):
            seen = n_seen + row
            slot = seen if seen < capacity else int(np.random.randint(0, seen + 1))
            if slot < capacity:
                owner[slot] = row
        slots = sorted(owner)
        return (torch.tensor(slots, dtype=torch.long, device=device),
                torch.tensor([owner[s] for s in slots], dtype=torch.long, device=device))


def install(seed: int, set_attribute=setattr) -> MammothDraws:
    """Route this process's draws through Mammoth's; returns the object holding their state. `set_attribute`:
    how to replace a module's function (a test passes pytest's monkeypatch.setattr, which undoes it)."""
    mammoth = MammothDraws(seed)
    set_attribute(draws, "stream_order", mammoth.stream_order)
    set_attribute(draws, "replay_rows", mammoth.replay_rows)
    set_attribute(reservoir, "reservoir_slots", mammoth.reservoir_slots)
    return mammoth


def main(argv: list[str]) -> int:
    from continual.args import parse_args
    from main import main as run_main

    install(parse_args(argv).seed or 0)
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
