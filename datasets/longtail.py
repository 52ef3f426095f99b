"""seq-longtail and seq-longtail32: a synthetic long-tailed dataset whose memorization answer is known.

Feldman's long-tail theory (Feldman 2020, "Does learning require memorization? A short tale about a long
tail"; Feldman & Zhang 2020) models a class as a mixture of subpopulations of very different frequencies.
An example of a subpopulation seen once in training (a singleton) can only be classified by fitting that
example itself: nothing else in the training set resembles it. A model trained without it gets its
subpopulation wrong, a model trained with it gets it right, so its memorization score (the accuracy on it
when it is in the training set minus when it is held out) is high. An example of a frequent subpopulation
is predicted just as well from the other members of its subpopulation, so its memorization score is low.
This dataset is built from such subpopulations, so the examples that must be memorized are known.

Composition, per class (10 classes, 16 subpopulations each, 160 in all):

    kind        subpopulations   train examples each   test examples each
    frequent    4                24                    6
    rare        4                4                     1
    singleton   8                1                     1

so 120 training and 36 test examples per class: 1200 training examples (80 singletons, 160 rare, 960
frequent) and 360 test examples. Every subpopulation has a prototype image drawn independently of every
other (no component is shared by a class's subpopulations), and each example is its prototype plus small
pixel noise; the test example of a singleton subpopulation is a second draw of the same prototype, so the
held-out accuracy on singletons shows the same effect as their memorization scores.

The data are generated from a fixed seed (SEED), whatever --seed says: every run, and every machine, sees
the same bytes. Training rows are in one fixed shuffled order; that order is the dataset order that score
files and `known_answer` refer to. Generation takes about 0.01 s (8×8) or 0.1 s (32×32) and reads nothing
under --data_path.

Shapes: seq-longtail is uint8 [N, 1, 8, 8] (the mlp's size, like seq-digits); seq-longtail32 is uint8
[N, 3, 32, 32] with the same subpopulations, rows and labels (each prototype is a 3-channel 8×8 pattern
shown at 4×4 pixels per cell, then pixel noise at full resolution), CIFAR's size, for convolutional
backbones.

Relabeled examples, the other kind Feldman's theory says must be memorized, come from the framework's
--label_noise flag (ContinualDataset relabels a seeded fraction of the training examples within their task
and records them in `noisy_mask`); `known_answer` describes the clean data.
"""
from __future__ import annotations

import numpy as np

from datasets import ContinualDataset, register_dataset

SEED = 2020  # fixes the data; --seed never changes them
N_CLASSES = 10
# (kind, subpopulations per class, training examples each, test examples each), in subpopulation order
KINDS = (("frequent", 4, 24, 6), ("rare", 4, 4, 1), ("singleton", 8, 1, 1))
SUBPOPULATIONS_PER_CLASS = sum(count for _, count, _, _ in KINDS)
# Prototype pixels are uniform in [LOW, HIGH]; an example adds Gaussian noise of NOISE grey levels. Two
# prototypes differ by about 64 grey levels per pixel on average, a prototype and its example by about 10.
LOW, HIGH, NOISE = 32, 224, 12.0
LAYOUT_STREAM, IMAGE_STREAM = 0, 1  # salts of the generators: which row is which, and the pixels


def subpopulation_sizes() -> tuple[np.ndarray, np.ndarray]:
    """Training and test examples of every subpopulation, by id: class · 16 + index in the class (0-3 frequent,
    4-7 rare, 8-15 singletons), so a subpopulation's class is its id // 16."""
    counts = [count for _, count, _, _ in KINDS]
    n_train = np.repeat([n for _, _, n, _ in KINDS], counts)
    n_test = np.repeat([n for _, _, _, n in KINDS], counts)
    return np.tile(n_train, N_CLASSES), np.tile(n_test, N_CLASSES)


def layout() -> tuple[np.ndarray, np.ndarray]:
    """The subpopulation id (int64) of every training row and of every test row, in dataset order (fixed
    shuffles)."""
    n_train, n_test = subpopulation_sizes()
    ids = np.arange(len(n_train), dtype=np.int64)
    rng = np.random.default_rng([SEED, LAYOUT_STREAM])
    train = np.repeat(ids, n_train)
    test = np.repeat(ids, n_test)
    return train[rng.permutation(len(train))], test[rng.permutation(len(test))]


def generate(channels: int, scale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test images (uint8 [N, channels, 8·scale, 8·scale]) and labels (int64 [N]).

    Prototypes are channels × 8 × 8 patterns, each cell repeated scale × scale times; the noise is drawn
    per pixel at full resolution."""
    train_sub, test_sub = layout()
    rng = np.random.default_rng([SEED, IMAGE_STREAM, channels, scale])
    n_subpopulations = N_CLASSES * SUBPOPULATIONS_PER_CLASS
    prototypes = rng.uniform(LOW, HIGH, (n_subpopulations, channels, 8, 8)).astype(np.float32)
    prototypes = prototypes.repeat(scale, axis=2).repeat(scale, axis=3)

    def draw(rows: np.ndarray) -> np.ndarray:
        noise = rng.standard_normal((len(rows), *prototypes.shape[1:]), dtype=np.float32) * NOISE
        return np.clip(np.rint(prototypes[rows] + noise), 0, 255).astype(np.uint8)

    train_x = draw(train_sub)
    test_x = draw(test_sub)
    return train_x, train_sub // SUBPOPULATIONS_PER_CLASS, test_x, test_sub // SUBPOPULATIONS_PER_CLASS


class _LongTail(ContinualDataset):
    """Shared attributes, generator and known answer of the long-tail family."""

    SETTING = "class-il"
    N_CLASSES = N_CLASSES
    N_TASKS = 5
    EMBEDDED = True
    DEFAULT_BATCH_SIZE = 32
    # Pixels are uniform in [32, 224] / 255 plus noise: mean 0.503, standard deviation 0.222 (measured).
    MEAN: tuple[float, ...] = (0.503,)
    STD: tuple[float, ...] = (0.222,)
    CHANNELS = 1
    SCALE = 1

    @classmethod
    def source(cls, data_path: str) -> str:
        return f"generated by datasets/longtail.py (seed {SEED}, no files)"

    def load(self, data_path, download):
        return generate(self.CHANNELS, self.SCALE)

    def known_answer(self) -> dict[str, np.ndarray]:
        """What the data are made of, per training row in dataset order and per test row:

        - "singleton" (bool [N_train]): the example is the only training example of its subpopulation
          (high memorization expected);
        - "subpopulation" (int64 [N_train]): its subpopulation id, class · 16 + index in the class (0-3
          frequent, 4-7 rare, 8-15 singletons; the class is the original one, before --class_order);
        - "subpopulation_size" (int64 [N_train]): training examples of its subpopulation (24, 4 or 1);
        - "test_subpopulation" (int64 [N_test]): the subpopulation id of every test row.

        Rows are the dataset's rows (`self.train.indices`); a class order only renames labels."""
        n_train, _ = subpopulation_sizes()
        train_sub, test_sub = layout()
        size = n_train[train_sub].astype(np.int64)
        return {"singleton": size == 1, "subpopulation": train_sub, "subpopulation_size": size,
                "test_subpopulation": test_sub}


@register_dataset("seq-longtail")
class SequentialLongTail(_LongTail):
    """1200 training images of 8×8 in 160 subpopulations (frequent, rare, singletons), 5 tasks × 2 classes."""

    SHAPE = (1, 8, 8)
    DEFAULT_BACKBONE = "mlp"
    # Measured with train_splits.py (16 MLPs 100-100 on halves, SGD lr 0.1, batch 32, seed 0): 10 epochs give
    # singletons a mean memorization of 0.87 against 0.09 for rare and 0.00 for frequent examples (AUROC of the
    # scores for singletons 0.998); 5 epochs of a 64-unit MLP still give 0.82 / 0.11 / 0.00.
    DEFAULT_N_EPOCHS = 10


@register_dataset("seq-longtail32")
class SequentialLongTail32(_LongTail):
    """seq-longtail's subpopulations as 3×32×32 images (8×8 prototypes at 4×4 pixels per cell), 5 tasks × 2."""

    SHAPE = (3, 32, 32)
    MEAN = (0.503, 0.503, 0.503)
    STD = (0.222, 0.222, 0.222)
    CHANNELS = 3
    SCALE = 4
    # Measured with train_splits.py (16 cnn 32,64 on halves, SGD lr 0.02, batch 32, 10 epochs, seed 0): singletons'
    # mean memorization 0.90, rare 0.09, frequent 0.00 (AUROC 1.00); a 64-unit MLP (lr 0.1, 5 epochs) separates
    # them less well (0.43 / 0.13 / 0.01, AUROC 0.92).
    DEFAULT_BACKBONE = "cnn"
    DEFAULT_N_EPOCHS = 10
