"""random-label-digits, random-label-mnist, random-label-cifar10: memorization streams.

Every task relabels one fixed set of training images (the first --random_label_examples in dataset
order) uniformly at random over the 10 classes; task t's labels come from
np.random.default_rng([seed, RANDOM_LABEL_STREAM, t]). Nothing generalizes, so the test split of a
task is the SAME images with the task's labels: its "test accuracy" is how well the network fits the
task's random labels (training accuracy at the end of the task), which falls when plasticity is lost.
`self.train` / `self.test` keep the images' true classes; the labels a task trains on come from
`task_labels(t)` through `train_split` / `test_split`.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from datasets import ContinualDataset, Split, register_dataset
from datasets.cifar import load_cifar
from datasets.digits import load_digits_split
from datasets.mnist import load_mnist
from utils.errors import ConfigError

RANDOM_LABEL_STREAM = 12  # salts the per-task generators (perm-mnist uses 10, rot-mnist 11)


class _RandomLabels(ContinualDataset):
    """A fixed image set whose labels every task redraws; test split = training split (memorization)."""

    SETTING = "domain-il"
    N_CLASSES = 10
    N_TASKS = 50
    LONG_STREAM = True
    DEFAULT_BATCH_SIZE = 100
    DEFAULT_N_EPOCHS = 20
    # the upper end, the release's number of training images, is checked when loading
    BOUNDS = {"random_label_examples": "[1, inf)"}

    @staticmethod
    def add_args(parser: argparse._ArgumentGroup) -> None:
        parser.add_argument("--random_label_examples", type=int, default=1000,
                            help="size of the fixed image set (the first N training images) every task relabels")

    def load_release(self, data_path: str, download: bool) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def load(self, data_path, download):
        train_x, train_y, _, _ = self.load_release(data_path, download)
        n = self.args.random_label_examples
        if not 1 <= n <= len(train_y):
            raise ConfigError(f"--random_label_examples must be between 1 and {self.NAME}'s {len(train_y)} "
                              f"training images, got {n}")
        return train_x[:n], train_y[:n], train_x[:n], train_y[:n]

    def __init__(self, args: argparse.Namespace):
        # These flags reorder or corrupt the true labels, which no task trains on: refuse, not ignore.
        for flag, value in (("--label_noise", args.label_noise), ("--class_order", args.class_order),
                            ("--permute_classes", args.permute_classes)):
            if value:
                raise ConfigError(f"{flag} does not apply to {self.NAME}, whose labels are redrawn at random "
                                  f"for every task; drop {flag}")
        super().__init__(args)
        self.test = self.train  # the same images and rows: one copy on the device

    def task_labels(self, task: int) -> torch.Tensor:
        """Task `task`'s labels of the fixed images, uniform over the 10 classes and seeded."""
        rng = np.random.default_rng([self.args.seed, RANDOM_LABEL_STREAM, task])
        return torch.from_numpy(rng.integers(0, self.N_CLASSES, len(self.train))).to(self.device)

    def _task_split(self, data: Split, task: int) -> Split:
        split = super()._task_split(data, task)
        return Split(split.images, self.task_labels(task), split.indices)


@register_dataset("random-label-digits")
class RandomLabelDigits(_RandomLabels):
    """The first N seq-digits training images, relabeled at random by every task; test = the same images."""

    SHAPE = (1, 8, 8)
    EMBEDDED = True
    # Measured with a fresh MLP 100-100, Adam 1e-3, batch 50: 150 epochs fit ~100% of the 1000 random
    # labels (20 epochs: 25%). Standardising the pixels (seq-digits' training statistics) halves the epochs
    # needed on raw pixels / 255.
    MEAN = (0.3055,)
    STD = (0.3759,)
    DEFAULT_BACKBONE = "mlp"
    DEFAULT_BATCH_SIZE = 50
    DEFAULT_N_EPOCHS = 150

    def load_release(self, data_path, download):
        return load_digits_split()


@register_dataset("random-label-mnist")
class RandomLabelMNIST(_RandomLabels):
    """The first N MNIST training images, relabeled at random by every task; test = the same images."""

    SHAPE = (1, 28, 28)
    MEAN = (0.1307,)
    STD = (0.3081,)
    DEFAULT_BACKBONE = "mlp"
    # random-label-digits' measured budget (3000 Adam steps fit 1000 random labels); 200 steps fit only a
    # fraction there, and Kumar et al.'s (L2 Init) random-label MNIST trains 400 epochs per task.
    DEFAULT_BATCH_SIZE = 50
    DEFAULT_N_EPOCHS = 150

    def load_release(self, data_path, download):
        return load_mnist(data_path, download)


@register_dataset("random-label-cifar10")
class RandomLabelCIFAR10(_RandomLabels):
    """The first N CIFAR-10 training images, relabeled at random by every task; test = the same images."""

    SHAPE = (3, 32, 32)
    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2615)
    # A fresh reduced ResNet-18 (Adam 1e-3, batch 100) fitted 1000 random labels of 32×32 images in 15 epochs.
    DEFAULT_BACKBONE = "reduced_resnet18"

    def load_release(self, data_path, download):
        return load_cifar(data_path, download, 10)
