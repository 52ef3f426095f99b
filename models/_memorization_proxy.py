"""The online memorization proxies: a value per training example from the forward passes training makes."""
from __future__ import annotations

import numpy as np
import torch

from utils.errors import ConfigError

PROXIES = ("learned_iteration", "cumulative_loss")


class MemorizationProxy:
    """An online memorization value per training example, from the forward passes training already makes.

    learned_iteration (the memorization-in-CL paper's): the step at which an example was last learned and then stayed
    correct; a wrong prediction forgets it. Later = more memorized; never learned = undefined (NaN).
    cumulative_loss: the sum of the example's training loss over all its passes.
    """

    def __init__(self, kind: str, n_examples: int, device: torch.device | str):
        if kind not in PROXIES:
            raise ConfigError(f"unknown --mem_proxy {kind!r}; known proxies: {', '.join(PROXIES)}")
        self.kind = kind
        self.step = 0
        self.learned_at = torch.full((n_examples,), -1, dtype=torch.long, device=device)
        self.loss_sum = torch.zeros(n_examples, device=device)
        self.passes = torch.zeros(n_examples, dtype=torch.long, device=device)

    def update(self, indices: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
               losses: torch.Tensor) -> None:
        """Record one training step's stream examples (no device synchronisation)."""
        with torch.no_grad():
            if self.kind == "learned_iteration":
                correct = logits.argmax(1) == labels
                before = self.learned_at[indices]
                self.learned_at[indices] = torch.where(correct, torch.where(before < 0, self.step, before), -1)
            else:
                self.loss_sum[indices] += losses.detach().float()
                self.passes[indices] += 1
        self.step += 1

    def values(self) -> np.ndarray:
        """The value of every example, NaN where undefined (never learned, or never seen)."""
        if self.kind == "learned_iteration":
            value = torch.where(self.learned_at >= 0, self.learned_at.float(), float("nan"))
        else:
            value = torch.where(self.passes > 0, self.loss_sum, float("nan"))
        return value.cpu().numpy()

    def state_dict(self) -> dict:
        return {"step": self.step, "learned_at": self.learned_at, "loss_sum": self.loss_sum, "passes": self.passes}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        for key in ("learned_at", "loss_sum", "passes"):
            getattr(self, key).copy_(state[key])
