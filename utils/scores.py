"""Per-example memorization values: precomputed score files and the online proxies of the maer model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from utils.continual_dataset import ContinualDataset
from utils.errors import ConfigError
from utils.split_store import fingerprint

PROXIES = ("learned_iteration", "cumulative_loss")


def original_train_labels(dataset: ContinualDataset) -> np.ndarray:
    """Training labels in the dataset's own class numbering (undoing --class_order), as score files see them."""
    return dataset.class_order[dataset.train.labels.cpu().numpy()]


def load_scores(path: str, dataset: ContinualDataset) -> np.ndarray:
    """A float32 score per training example in dataset order, checked against the dataset; NaN = undefined.

    Accepts eval_splits.py output (checked against its JSON sidecar: dataset and label fingerprint)
    and the seed paper's released float32 arrays (checked by length).
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--mem_scores {path}: no such file; pass the .npy written by eval_splits.py")
    try:
        scores = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--mem_scores {path} is not a readable .npy array ({type(error).__name__})") from None
    n = len(dataset.train)
    if scores.ndim != 1 or len(scores) != n:
        raise ConfigError(f"--mem_scores {path} holds {scores.shape} scores but {dataset.NAME} has {n} training "
                          f"examples; pass the score file of this dataset, in dataset order")
    sidecar = file.with_suffix(".json")
    if sidecar.exists():
        meta = json.loads(sidecar.read_text())
        if meta.get("dataset") not in (None, dataset.NAME):
            raise ConfigError(f"--mem_scores {path} was computed on {meta['dataset']}, not {dataset.NAME}; pass "
                              f"the score file of {dataset.NAME}")
        expected = meta.get("label_fingerprint")
        if expected is not None and expected != fingerprint(original_train_labels(dataset)):
            raise ConfigError(f"--mem_scores {path} was computed on other training labels than this run's "
                              f"(different --label_noise or data files); pass the score file of these labels")
    return scores.astype(np.float32)


class MemorizationProxy:
    """An online memorization value per training example, from the forward passes training already makes.

    learned_iteration (the seed paper's): the step at which an example was last learned and then stayed
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
