"""Datasets, one file per family, registered by their CLI name (`seq-digits`, `seq-cifar10`, ...).

The contract every dataset fulfils lives here: `ContinualDataset` reads the standard release files
into uint8 tensors on the training device and cuts them into tasks; a task's data is a `Split`
(images, labels, dataset indices). Augmentation runs on whole batches (`datasets/_augment.py`).
A new dataset is one file that subclasses `ContinualDataset`, sets its class attributes, implements
`load`, and is decorated with `@register_dataset("name")`.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datasets._augment import random_crop, random_flip, to_float
from utils.errors import ConfigError
from utils.registry import Registry


@dataclass
class Split:
    """One task's examples: uint8 images, labels in continual order, and each example's dataset index."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    indices: torch.Tensor  # int64 [N], row of the example in the dataset's train (or test) arrays

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(splits: list["Split"]) -> "Split":
        return Split(*(torch.cat([getattr(s, f) for s in splits]) for f in ("images", "labels", "indices")))


class ContinualDataset:
    """A dataset read from disk and cut into tasks.

    Subclasses set the class attributes and implement `load`, which returns the standard
    train/test arrays as (uint8 [N, C, H, W], int64 [N]) in the order of the on-disk release;
    that order is the dataset order every score file and buffer index refers to.
    """

    NAME: str
    SETTING: str = "class-il"  # or "domain-il": every task has all classes, transformed
    N_CLASSES: int
    N_TASKS: int
    SHAPE: tuple[int, int, int]
    MEAN: tuple[float, ...] | None = None
    STD: tuple[float, ...] | None = None
    CROP_PADDING: int = 0
    FLIP: bool = False
    DEFAULT_BACKBONE: str = "mlp"
    DEFAULT_BATCH_SIZE: int = 32
    DEFAULT_N_EPOCHS: int = 1
    # A long stream (hundreds of tasks) is evaluated on the task just trained only, by default: its
    # terminal accuracy, not the whole accuracy matrix (see --eval_scope).
    LONG_STREAM: bool = False
    EMBEDDED: bool = False  # read from a package (scikit-learn's digits), not from files under --data_path
    mem_scores: np.ndarray | None = None  # per training example (dataset order), set from --mem_scores
    training_subset: torch.Tensor | None = None  # bool [N_train]: the examples trained on (keep_training_examples)

    @staticmethod
    def add_args(parser: argparse._ArgumentGroup) -> None:
        """Dataset-specific flags (none by default)."""

    @staticmethod
    def check_args(args: argparse.Namespace) -> None:
        """Refuse, with one sentence (ConfigError), values a range cannot express (conditions across flags, limits
        that depend on the dataset); a flag's own range is declared in BOUNDS and checked before this."""

    def load(self, data_path: str, download: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def source(cls, data_path: str) -> str:
        """Where the data were read from, as a run's dataset input names it."""
        return "scikit-learn's bundled digits" if cls.EMBEDDED else str(Path(data_path).resolve())

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.n_tasks = self.N_TASKS if args.n_tasks is None else args.n_tasks
        self._check_task_count()
        train_x, train_y, test_x, test_y = self.load(args.data_path, args.download)
        for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
            if x.dtype != np.uint8 or x.shape[1:] != self.SHAPE or len(x) != len(y):
                raise ConfigError(
                    f"{self.NAME} {name} data has shape {x.shape} ({x.dtype}) for {len(y)} labels, "
                    f"expected uint8 [N, {', '.join(map(str, self.SHAPE))}]; the files under "
                    f"{args.data_path} are not the standard release, download them again"
                )
        self.class_order = self._class_order(args)
        to_continual = np.argsort(self.class_order)  # original class → position in the class order
        train_y = to_continual[train_y]
        test_y = to_continual[test_y]
        self.clean_train_labels = train_y.copy()
        self.noisy_mask = self._label_noise_mask(len(train_y), args.label_noise, args.seed)
        train_y = self._relabel(train_y, self.noisy_mask, args.seed)
        self.train = self._to_device(train_x, train_y)
        self.test = self._to_device(test_x, test_y)
        self._mean = None if self.MEAN is None else torch.tensor(self.MEAN, device=self.device).view(-1, 1, 1)
        self._std = None if self.STD is None else torch.tensor(self.STD, device=self.device).view(-1, 1, 1)

    # -- tasks ---------------------------------------------------------------------------------
    @property
    def classes_per_task(self) -> int:
        return self.N_CLASSES if self.SETTING == "domain-il" else self.N_CLASSES // self.n_tasks

    def task_classes(self, task: int) -> range:
        """Labels (in continual order) that belong to a task."""
        if self.SETTING == "domain-il":
            return range(self.N_CLASSES)
        return range(task * self.classes_per_task, (task + 1) * self.classes_per_task)

    def seen_classes(self, task: int) -> int:
        """Number of output classes that exist after training task `task`."""
        return self.N_CLASSES if self.SETTING == "domain-il" else (task + 1) * self.classes_per_task

    def train_split(self, task: int) -> Split:
        return self._kept(self._task_split(self.train, task))

    def _kept(self, split: Split) -> Split:
        """A training split without the examples keep_training_examples left out (a dataset that overrides
        train_split passes its split through this too)."""
        if self.training_subset is None:
            return split
        keep = self.training_subset[split.indices]
        return Split(split.images[keep], split.labels[keep], split.indices[keep])

    def keep_training_examples(self, mask: np.ndarray) -> None:
        """Train on the masked examples only (bool [N_train], dataset order): every task's training split then
        holds its masked examples, while `self.train`, the test splits and every dataset index stay whole (a
        learner of a stream plan, memorization/stream.py)."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (len(self.train),):
            raise ValueError(f"a training mask of shape {mask.shape} for {len(self.train)} training examples")
        self.training_subset = torch.from_numpy(mask).to(self.device)

    def known_answer(self) -> dict[str, np.ndarray] | None:
        """For a dataset built with a known memorization answer (datasets/longtail.py), the per-example truth in
        dataset order ("singleton" bool [N_train], ...); None for real data."""
        return None

    def test_split(self, task: int) -> Split:
        return self._task_split(self.test, task)

    def task_transform(self, task: int, images: torch.Tensor) -> torch.Tensor:
        """What makes a domain-IL task different (a permutation, a rotation); identity otherwise."""
        return images

    def _task_split(self, data: Split, task: int) -> Split:
        if not 0 <= task < self.n_tasks:
            raise IndexError(f"task {task} outside 0..{self.n_tasks - 1}")
        if self.SETTING == "domain-il":
            return Split(self.task_transform(task, data.images), data.labels, data.indices)
        classes = self.task_classes(task)
        keep = (data.labels >= classes.start) & (data.labels < classes.stop)
        return Split(data.images[keep], data.labels[keep], data.indices[keep])

    # -- transforms ----------------------------------------------------------------------------
    def train_transform(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augmentation of a whole uint8 batch on its device, then conversion to normalised floats; the
        random draws come from `generator` (a CPU one) when given, else from the global generator."""
        if self.CROP_PADDING:
            images = random_crop(images, self.CROP_PADDING, generator)
        if self.FLIP:
            images = random_flip(images, generator)
        return to_float(images, self._mean, self._std)

    def test_transform(self, images: torch.Tensor) -> torch.Tensor:
        return to_float(images, self._mean, self._std)

    # -- construction helpers ------------------------------------------------------------------
    def _check_task_count(self) -> None:
        if self.n_tasks < 1:
            raise ConfigError(f"--n_tasks must be at least 1, got {self.n_tasks}")
        if self.SETTING == "class-il":
            if self.n_tasks > self.N_CLASSES:
                raise ConfigError(
                    f"{self.NAME} has {self.N_CLASSES} classes, so it cannot be split into "
                    f"{self.n_tasks} tasks; pass --n_tasks of at most {self.N_CLASSES}"
                )
            if self.N_CLASSES % self.n_tasks:
                divisors = [d for d in range(1, self.N_CLASSES + 1) if self.N_CLASSES % d == 0]
                raise ConfigError(
                    f"{self.NAME}'s {self.N_CLASSES} classes do not split evenly into {self.n_tasks} "
                    f"tasks; pass --n_tasks as one of {', '.join(map(str, divisors))}"
                )

    def _class_order(self, args: argparse.Namespace) -> np.ndarray:
        if args.class_order:
            try:
                order = np.array([int(c) for c in args.class_order.split(",")])
            except ValueError:
                raise ConfigError(f"--class_order must be comma-separated integers, got {args.class_order!r}")
            if sorted(order.tolist()) != list(range(self.N_CLASSES)):
                raise ConfigError(
                    f"--class_order must list each of the {self.N_CLASSES} classes 0..{self.N_CLASSES - 1} "
                    f"exactly once, got {args.class_order!r}"
                )
            return order
        if args.permute_classes:
            return np.random.default_rng([args.seed, 1]).permutation(self.N_CLASSES)
        return np.arange(self.N_CLASSES)

    def _label_noise_mask(self, n: int, fraction: float, seed: int) -> np.ndarray:
        if not 0.0 <= fraction < 1.0:
            raise ConfigError(f"--label_noise is a fraction in [0, 1), got {fraction}")
        mask = np.zeros(n, dtype=bool)
        mask[np.random.default_rng([seed, 2]).permutation(n)[: round(fraction * n)]] = True
        return mask

    def _relabel(self, labels: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray:
        """Give every masked example a different label of the same task, so it stays in its task."""
        labels = labels.copy()
        if not mask.any():
            return labels
        group = self.N_CLASSES if self.SETTING == "domain-il" else self.classes_per_task
        if group < 2:
            raise ConfigError("--label_noise needs at least 2 classes per task to relabel an example")
        rng = np.random.default_rng([seed, 3])
        offset = rng.integers(1, group, size=int(mask.sum()))  # never 0: the new label always differs
        old = labels[mask]
        labels[mask] = old - old % group + (old % group + offset) % group
        return labels

    def _to_device(self, images: np.ndarray, labels: np.ndarray) -> Split:
        return Split(
            torch.from_numpy(np.ascontiguousarray(images)).to(self.device),
            torch.from_numpy(labels.astype(np.int64)).to(self.device),
            torch.arange(len(labels), device=self.device),
        )


def download_release(dataset: str, folder: str, fetch) -> None:
    """Run `fetch()` (torchvision's download of the release), ending with one sentence when it fails."""
    try:
        fetch()
    except Exception as error:  # noqa: BLE001  offline (URLError), refused, truncated, checksum: all end here
        reason = getattr(error, "reason", None) or (str(error).splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"downloading {dataset} failed ({reason}); if this machine is offline, copy the release "
                          f"files into {os.path.abspath(folder)} from a machine that is online") from None


def release_folder(data_path: str, layouts: tuple[str, ...], files: list[str]) -> str:
    """The folder under --data_path that holds every file of a release, of the `layouts` it may be kept in: this
    framework's first, then Mammoth's (whose `--base_path` is the same folder one level up in the tree, e.g.
    `<base_path>/CIFAR10/cifar-10-batches-py`). The first layout when none is complete: where --download writes
    and the folder a missing-file error names."""
    folders = [os.path.join(data_path, layout) for layout in layouts]
    return next((f for f in folders if all(os.path.exists(os.path.join(f, name)) for name in files)), folders[0])


def require_files(dataset: str, folder: str, files: list[str], downloadable: bool = True,
                  also: tuple[str, ...] = ()) -> None:
    """End with one sentence naming the missing files and where they are expected (`also`: other layouts read)."""
    missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
    if missing:
        how = " or pass --download on a machine that is online" if downloadable else ""
        elsewhere = f" or in Mammoth's layout ({' or '.join(also)} under --data_path)" if also else ""
        raise ConfigError(
            f"{dataset} is not in {os.path.abspath(folder)}: missing {', '.join(missing)}; "
            f"put the standard release files there{elsewhere} (or point --data_path at their parent){how}"
        )


DATASETS: Registry[ContinualDataset] = Registry("dataset", "datasets")
register_dataset = DATASETS.register
