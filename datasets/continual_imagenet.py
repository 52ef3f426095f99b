"""continual-imagenet: a long stream of binary tasks over the 1000 classes of ImageNet at 32×32.

Files: the "Imagenet32" downsampled ImageNet release of image-net.org (npz version), all eleven in
<data_path>/imagenet32/: train_data_batch_1.npz … train_data_batch_10.npz and val_data.npz (the release
ships train and val in two archives; put their files in one folder). Keys: `data`, uint8 [N, 3072], three
32×32 channel planes (CHW, like CIFAR); `labels`, the class 1..1000 of each row.

Protocols (--imagenet_protocol), both seeded by --seed:
- vit (the ViT study's protocol): the classes are split at random into two families of 500; task t is
  family_a[t] (label 0) against family_b[t] (label 1), so every class is used once: at most 500 tasks.
- cnn (Dohare et al. 2024): a random class order; task t is order[2t] (label 0) against order[2t+1]
  (label 1). The first 500 tasks use every class once; beyond (--n_tasks > 500) every further 500 tasks
  take a fresh permutation, so classes, and possibly pairs, come back.
Train: the first --imagenet_train_per_class training images of each class in file order (batches 1..10
concatenated); test: the first --imagenet_test_per_class validation images of each class (val has 50).
Every task is labelled 0/1 and shares one 2-way head (domain-IL setting), with no augmentation.

Only the classes the chosen tasks use are read, once each, and kept as uint8 tensors on the device (the
whole release is 3.8 GB). Rows of `self.train` / `self.test` are those images in file order (the dataset
order of `Split.indices` and score files); `train_classes` / `test_classes` hold each row's original
0-based class and `train_release_rows` / `test_release_rows` its row in the release files. A row's label
in `self.train` / `self.test` is its label in the first task that uses its class (its only task in the
vit protocol); `train_split(t)` / `test_split(t)` give task t's rows with the task's labels. `task_pairs`
[n_tasks, 2] holds each task's original classes (label 0, label 1); `class_order` is it flattened.
--label_noise flips the label of the chosen training rows in every task that uses them.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from datasets import ContinualDataset, Split, register_dataset, require_files
from utils.errors import ConfigError

N_RELEASE_CLASSES = 1000
FAMILY_SIZE = N_RELEASE_CLASSES // 2  # tasks per pass over the classes
TRAIN_FILES = [f"train_data_batch_{i}.npz" for i in range(1, 11)]
VAL_FILE = "val_data.npz"
RELEASE = "Imagenet32 (the npz version of image-net.org's downsampled ImageNet)"
IMAGENET_STREAM = 13  # salts the class permutations (perm-mnist uses 10, rot-mnist 11, random labels 12)


def class_permutation(seed: int, round_: int) -> np.ndarray:
    """A seeded permutation of the 1000 original (0-based) classes; one per pass over the classes."""
    return np.random.default_rng([seed, IMAGENET_STREAM, round_]).permutation(N_RELEASE_CLASSES)


def task_pairs(protocol: str, seed: int, n_tasks: int) -> np.ndarray:
    """Original classes (label 0, label 1) of every task, int64 [n_tasks, 2]."""
    if protocol == "vit":
        order = class_permutation(seed, 0)
        return np.stack([order[:FAMILY_SIZE], order[FAMILY_SIZE:]], 1)[:n_tasks]
    rounds = -(-n_tasks // FAMILY_SIZE)
    return np.concatenate([class_permutation(seed, r) for r in range(rounds)]).reshape(-1, 2)[:n_tasks]


def read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 [N, 3, 32, 32]) and 0-based classes (int64 [N]) of one Imagenet32 npz file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            data, labels = (npz[key] if key in npz.files else np.empty(0) for key in ("data", "labels"))
    except Exception as error:  # a truncated, foreign or pickled file raises many kinds of errors
        raise ConfigError(f"{path} cannot be read as an npz archive of arrays ({type(error).__name__}); "
                          f"download it again from the {RELEASE} release") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),) \
            or labels.dtype.kind not in "iu" or not 1 <= labels.min(initial=1) <= labels.max(initial=1) <= 1000:
        raise ConfigError(f"{path} lacks uint8 'data' [N, 3072] with one 'labels' entry in 1..1000 per row; it is "
                          f"not the {RELEASE} release, so download it again")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64) - 1


def rank_in_class(labels: np.ndarray) -> np.ndarray:
    """How many earlier rows of the array have the same label as each row."""
    order = np.argsort(labels, kind="stable")
    ordered = labels[order]
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(labels)) - np.searchsorted(ordered, ordered)
    return rank


def read_classes(folder: str, files: list[str], classes: np.ndarray, per_class: int,
                 flag: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first `per_class` images of each of `classes`, in file order: images, classes, release rows."""
    wanted = np.zeros(N_RELEASE_CLASSES, bool)
    wanted[classes] = True
    met = np.zeros(N_RELEASE_CLASSES, np.int64)  # images of each class in the files read so far
    n = len(classes) * per_class
    images, kept_classes, rows = np.empty((n, 3, 32, 32), np.uint8), np.empty(n, np.int64), np.empty(n, np.int64)
    filled = offset = 0
    for name in files:
        if (met[classes] >= per_class).all():
            break  # every class is complete: the remaining files are not needed
        data, labels = read_npz(os.path.join(folder, name))
        keep = np.flatnonzero(wanted[labels] & (met[labels] + rank_in_class(labels) < per_class))
        images[filled:filled + len(keep)] = data[keep]
        kept_classes[filled:filled + len(keep)] = labels[keep]
        rows[filled:filled + len(keep)] = offset + keep
        filled, offset = filled + len(keep), offset + len(labels)
        met += np.bincount(labels, minlength=N_RELEASE_CLASSES)
    short = classes[met[classes] < per_class]
    if len(short):
        source = files[0] if len(files) == 1 else f"{files[0]} … {files[-1]}"
        raise ConfigError(f"{folder} has only {met[short[0]]} images of class {short[0] + 1} in {source} (one of "
                          f"{len(short)} classes with fewer than {per_class}); pass {flag} of at most {met[classes].min()}")
    return images, kept_classes, rows


@register_dataset("continual-imagenet")
class ContinualImageNet(ContinualDataset):
    """ImageNet 32×32 as up to 500 binary tasks (two class families, or pairs of a class order) on one 2-way head."""

    SETTING = "domain-il"  # one shared head: evaluation takes the argmax over both outputs
    N_CLASSES = 2
    N_TASKS = 500
    SHAPE = (3, 32, 32)
    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)
    DEFAULT_BACKBONE = "vit"
    DEFAULT_BATCH_SIZE = 100
    DEFAULT_N_EPOCHS = 10
    LONG_STREAM = True
    # at least one image per class; the release's own counts (50 validation images) are checked when loading
    BOUNDS = {"imagenet_train_per_class": "[1, inf)", "imagenet_test_per_class": "[1, inf)"}

    @staticmethod
    def add_args(parser: argparse._ArgumentGroup) -> None:
        parser.add_argument("--imagenet_protocol", choices=("vit", "cnn"), default="vit",
                            help="vit: two class families, each class in one task; cnn: pairs of a class order")
        parser.add_argument("--imagenet_train_per_class", type=int, default=600,
                            help="training images per class (the first ones in file order)")
        parser.add_argument("--imagenet_test_per_class", type=int, default=50,
                            help="test images per class (from the validation file, which has 50)")

    def __init__(self, args: argparse.Namespace):
        if args.class_order or args.permute_classes:
            raise ConfigError("--class_order and --permute_classes do not apply to continual-imagenet, whose tasks "
                              "pair classes by --imagenet_protocol and --seed; drop them")
        super().__init__(args)
        self.class_order = self.task_pairs.flatten()  # logged by main.py: each task's (label 0, label 1) classes
        self._train_classes = torch.from_numpy(self.train_classes).to(self.device)
        self._test_classes = torch.from_numpy(self.test_classes).to(self.device)
        self._flipped = torch.from_numpy(self.noisy_mask).to(self.device)

    def _check_task_count(self) -> None:
        super()._check_task_count()
        if self.args.imagenet_protocol == "vit" and self.n_tasks > FAMILY_SIZE:
            raise ConfigError(f"continual-imagenet's vit protocol uses each of the 1000 classes once, so it has at most "
                              f"{FAMILY_SIZE} tasks; pass --n_tasks of at most {FAMILY_SIZE} (or --imagenet_protocol "
                              f"cnn, whose classes repeat after {FAMILY_SIZE} tasks)")

    def load(self, data_path, download):
        args = self.args
        folder = os.path.join(data_path, "imagenet32")
        require_files(RELEASE, folder, TRAIN_FILES + [VAL_FILE], downloadable=False)
        self.task_pairs = task_pairs(args.imagenet_protocol, args.seed, self.n_tasks)
        classes = np.unique(self.task_pairs)
        train_x, self.train_classes, self.train_release_rows = read_classes(
            folder, TRAIN_FILES, classes, args.imagenet_train_per_class, "--imagenet_train_per_class")
        test_x, self.test_classes, self.test_release_rows = read_classes(
            folder, [VAL_FILE], classes, args.imagenet_test_per_class, "--imagenet_test_per_class")
        # Each class's label in the first task that uses it: position of its first occurrence in the pairs.
        used, first = np.unique(self.task_pairs.flatten(), return_index=True)
        first_label = np.zeros(N_RELEASE_CLASSES, np.int64)
        first_label[used] = first % 2
        return train_x, first_label[self.train_classes], test_x, first_label[self.test_classes]

    def train_split(self, task: int) -> Split:
        return self._kept(self._pair_split(self.train, self._train_classes, self._flipped, task))

    def test_split(self, task: int) -> Split:
        return self._pair_split(self.test, self._test_classes, None, task)

    def _pair_split(self, data: Split, classes: torch.Tensor, flipped: torch.Tensor | None, task: int) -> Split:
        """Task `task`'s rows in dataset order: label 1 for its second class, flipped where noise says so."""
        if not 0 <= task < self.n_tasks:
            raise IndexError(f"task {task} outside 0..{self.n_tasks - 1}")
        first, second = (int(c) for c in self.task_pairs[task])
        rows = torch.nonzero((classes == first) | (classes == second)).squeeze(1)
        labels = (classes[rows] == second).long()
        if flipped is not None:
            labels ^= flipped[rows].long()
        return Split(data.images[rows], labels, data.indices[rows])
