"""seq-digits and perm-digits: scikit-learn's bundled 8×8 handwritten digits (real data, available offline)."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from datasets import ContinualDataset, register_dataset
from datasets.mnist import PermutedPixels

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # the train/test split is fixed, whatever --seed says, so results stay comparable


def digits_file() -> Path:
    """scikit-learn's bundled copy of the UCI digits (1797 rows of 64 pixels in 0..16, then the label).

    Read directly: `sklearn.datasets.load_digits` reads the same file but importing it costs seconds."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed, class-stratified 80/20 split: train and test images (uint8 [N, 1, 8, 8]) and labels."""
    with gzip.open(digits_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    images = np.round(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = table[:, -1].astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        members = np.flatnonzero(labels == c)
        is_test[rng.permutation(members)[: round(TEST_FRACTION * len(members))]] = True
    return images[~is_test], labels[~is_test], images[is_test], labels[is_test]


class _Digits(ContinualDataset):
    """Shared attributes and loader of the digits family."""

    N_CLASSES = 10
    EMBEDDED = True
    SHAPE = (1, 8, 8)
    DEFAULT_BACKBONE = "mlp"
    DEFAULT_BATCH_SIZE = 32

    def load(self, data_path, download):
        return load_digits_split()


@register_dataset("seq-digits")
class SequentialDigits(_Digits):
    """1797 images, 5 tasks × 2 classes; a fixed, class-stratified 80/20 train/test split."""

    SETTING = "class-il"
    N_TASKS = 5
    DEFAULT_N_EPOCHS = 10


@register_dataset("perm-digits")
class PermutedDigits(PermutedPixels, _Digits):
    """Domain-IL digits: every task shuffles the 64 pixels by its own fixed permutation (seq-digits' split)."""

    SETTING = "domain-il"
    N_TASKS = 50
    LONG_STREAM = True
    DEFAULT_N_EPOCHS = 5
