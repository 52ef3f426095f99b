"""A subset-training plan: which examples each model trains on (seeded inclusion masks), its seeds and settings.

The plan is written into the run store first; its hash ties every model file to it, so models of
another plan are never mixed in.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np


def fingerprint(labels: np.ndarray) -> str:
    """Short hash of a label vector: ties scores to the exact dataset (and order) they were computed on."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]


def balanced_masks(n: int, ratio: float, n_models: int, rng: np.random.Generator) -> np.ndarray:
    """K subsets of exactly round(ratio·n) examples in which every example appears equally often (±1).

    Each subset takes the examples included least often so far, ties broken at random; the
    spread of inclusion counts therefore never exceeds 1, so no example is always in or always out
    unless K is tiny.
    """
    size = int(round(ratio * n))
    counts = np.zeros(n, dtype=np.int64)
    masks = np.zeros((n_models, n), dtype=bool)
    for k in range(n_models):
        chosen = np.argpartition(counts + rng.random(n), size - 1)[:size] if size < n else np.arange(n)
        masks[k, chosen] = True
        counts[chosen] += 1
    return masks


def random_masks(n: int, ratio: float, n_models: int, rng: np.random.Generator) -> np.ndarray:
    """K independent uniformly random subsets of round(ratio·n) examples (the original estimator's sampling)."""
    size = int(round(ratio * n))
    masks = np.zeros((n_models, n), dtype=bool)
    for k in range(n_models):
        masks[k, rng.choice(n, size, replace=False)] = True
    return masks


def stratified_masks(labels: np.ndarray, ratio: float, n_models: int, rng: np.random.Generator) -> np.ndarray:
    """Balanced masks drawn class by class: every subset holds round(ratio·n_c) examples of each class c
    (the memorization-in-CL paper's per-class 50/50 splits at ratio 0.5)."""
    masks = np.zeros((n_models, len(labels)), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        masks[:, rows] = balanced_masks(len(rows), ratio, n_models, rng)
    return masks


@dataclass
class Plan:
    settings: dict  # JSON-able: dataset, sizes, fingerprints, ratios, seeds, training settings
    inclusion_mask: np.ndarray  # bool [K, n]
    model_ratio: np.ndarray  # float64 [K]
    model_seed: np.ndarray  # int64 [K]
    train_indices: np.ndarray  # int64 [n]: dataset index of each planned training example
    noisy_mask: np.ndarray  # bool [N_train]
    input_noise_mask: np.ndarray  # bool [N_train]

    @property
    def n_models(self) -> int:
        return len(self.model_seed)

    @property
    def kind(self) -> str:
        """subsets, loo or stream."""
        return self.settings.get("kind", "subsets")

    @property
    def record_points(self) -> list[int]:
        """When each model's predictions are stored: the recorded epochs (1-based), or for a stream plan the end of
        every task (1..T)."""
        if self.kind == "stream":
            return list(range(1, self.settings["n_tasks"] + 1))
        return list(self.settings["training"]["record_epochs"])

    @property
    def progress_units(self) -> int:
        """What a model's training reports its progress in: epochs, or for a stream plan tasks."""
        return self.settings["n_tasks"] if self.kind == "stream" else self.settings["training"]["n_epochs"]

    @property
    def groups(self) -> list[list[int]]:
        """The plan's groups of models trained together (one ensemble each, the unit of work): consecutive
        models of one subset ratio, `group_size` at a time. A model's results depend on its group's size
        (a group of one takes other kernels), so the groups are part of the plan."""
        size = self.settings.get("grouping", {}).get("size", 1)
        groups = []
        for ratio in dict.fromkeys(self.model_ratio.tolist()):
            same = np.flatnonzero(self.model_ratio == ratio).tolist()
            groups += [same[i:i + size] for i in range(0, len(same), size)]
        return groups

    @property
    def hash(self) -> str:
        digest = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode())
        for array in (self.inclusion_mask, self.model_ratio, self.model_seed, self.train_indices, self.noisy_mask,
                      self.input_noise_mask):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:32]


def loo_masks(n: int, positions: np.ndarray, n_seeds: int) -> tuple[np.ndarray, np.ndarray]:
    """The masks of a leave-one-out plan over n examples and its model → seed-index map.

    For each seed s (seed-major): one model on all n examples, then one model per left-out position p
    (every example but p). Model s·(L+1) is seed s's full model and s·(L+1)+1+l the model without
    positions[l]; a full model and the models without one example of the same seed share the seed.
    """
    n_loo = len(positions)
    one_seed = np.ones((n_loo + 1, n), dtype=bool)
    one_seed[1 + np.arange(n_loo), positions] = False
    return np.tile(one_seed, (n_seeds, 1)), np.repeat(np.arange(n_seeds), n_loo + 1)


def loo_layout(plan: "Plan") -> tuple[np.ndarray, int]:
    """A leave-one-out plan's left-out positions (into the plan's training examples) and its seeds per model."""
    positions = np.searchsorted(plan.train_indices, np.asarray(plan.settings["loo_examples"], dtype=np.int64))
    return positions, int(plan.settings["loo_seeds"])


def is_loo(plan: "Plan | None") -> bool:
    return plan is not None and plan.settings.get("kind") == "loo"
