"""seq-digits: scikit-learn's bundled 8×8 handwritten digits (real data, available offline)."""
from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from datasets import register_dataset
from utils.continual_dataset import ContinualDataset

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # the train/test split is fixed, whatever --seed says, so results stay comparable


@register_dataset("seq-digits")
class SequentialDigits(ContinualDataset):
    """1797 images, 5 tasks × 2 classes; a fixed, class-stratified 80/20 train/test split."""

    SETTING = "class-il"
    N_CLASSES = 10
    N_TASKS = 5
    SHAPE = (1, 8, 8)
    DEFAULT_BACKBONE = "mlp"
    DEFAULT_BATCH_SIZE = 32
    DEFAULT_N_EPOCHS = 10

    def load(self, data_path, download):
        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
        labels = digits.target.astype(np.int64)
        rng = np.random.default_rng(SPLIT_SEED)
        is_test = np.zeros(len(labels), dtype=bool)
        for c in range(self.N_CLASSES):
            members = np.flatnonzero(labels == c)
            is_test[rng.permutation(members)[: round(TEST_FRACTION * len(members))]] = True
        return images[~is_test], labels[~is_test], images[is_test], labels[is_test]
