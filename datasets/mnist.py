"""seq-mnist, perm-mnist and rot-mnist: MNIST read from the standard idx files (torchvision's layout)."""
from __future__ import annotations

import os

import numpy as np
import torch

from datasets import ContinualDataset, download_release, register_dataset, release_folder, require_files
from utils.errors import ConfigError

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# torchvision keeps MNIST in <root>/<class name>/raw. This framework's root is --data_path; Mammoth's is
# <base_path>/MNIST, where its test set (class MNIST) and its training set (class MyMNIST) each download all four files.
LAYOUTS = (os.path.join("MNIST", "raw"), os.path.join("MNIST", "MNIST", "raw"), os.path.join("MNIST", "MyMNIST", "raw"))
PERMUTATION_STREAM = 10  # salts the per-task generators so they never coincide with the base class's streams
ROTATION_STREAM = 11


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Parse an idx file of unsigned bytes, checking its magic number, dimensions and length."""
    raw = np.fromfile(path, dtype=np.uint8)  # writable, unlike np.frombuffer over bytes
    header = 4 + 4 * ndim
    # Magic number: two zero bytes, 0x08 for unsigned bytes, then the number of dimensions.
    ok = len(raw) >= header and raw[:4].tolist() == [0, 0, 0x08, ndim]
    if ok:
        dims = tuple(int(d) for d in raw[4:header].view(">u4"))
        ok = len(raw) == header + int(np.prod(dims))
    if not ok:
        raise ConfigError(f"{path} is not a valid idx file (truncated or corrupt); delete it and download it again")
    return raw[header:].reshape(dims)


def load_mnist(data_path: str, download: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test images (uint8 [N, 1, 28, 28]) and labels (int64) in the order of the idx files."""
    folder = release_folder(data_path, LAYOUTS, list(FILES))
    if download and not all(os.path.exists(os.path.join(folder, f)) for f in FILES):
        import torchvision

        download_release("MNIST", folder, lambda: torchvision.datasets.MNIST(root=data_path, download=True))
    require_files("MNIST", folder, list(FILES), also=LAYOUTS[1:])
    arrays = []
    for split in ("train", "t10k"):
        images_path = os.path.join(folder, f"{split}-images-idx3-ubyte")
        labels_path = os.path.join(folder, f"{split}-labels-idx1-ubyte")
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1).astype(np.int64)
        if images.shape[1:] != (28, 28) or len(images) != len(labels) or labels.max(initial=0) > 9:
            raise ConfigError(
                f"{images_path} ({images.shape}) and {labels_path} ({len(labels)} labels) do not form "
                f"MNIST's 28×28 images with labels 0..9; download them again"
            )
        arrays += [images[:, None], labels]
    return tuple(arrays)


class PermutedPixels:
    """Domain-IL mixin: every task shuffles the pixels of the H×W image by its own fixed, seeded permutation."""

    def permutation(self, task: int) -> torch.Tensor:
        """The task's pixel permutation over the flattened H×W image (a bijection of 0..H·W−1)."""
        rng = np.random.default_rng([self.args.seed, PERMUTATION_STREAM, task])
        return torch.from_numpy(rng.permutation(self.SHAPE[1] * self.SHAPE[2])).to(self.device)

    def task_transform(self, task: int, images: torch.Tensor) -> torch.Tensor:
        # Every channel of a pixel moves together (MNIST and digits have one channel).
        return images.flatten(2)[:, :, self.permutation(task)].view_as(images)


class _MNIST(ContinualDataset):
    """Shared attributes and loader of the MNIST family."""

    N_CLASSES = 10
    SHAPE = (1, 28, 28)
    DEFAULT_BACKBONE = "mlp"
    DEFAULT_N_EPOCHS = 1

    def load(self, data_path, download):
        return load_mnist(data_path, download)


@register_dataset("seq-mnist")
class SequentialMNIST(_MNIST):
    """Class-IL MNIST: 5 tasks × 2 classes, raw pixels."""

    SETTING = "class-il"
    N_TASKS = 5
    DEFAULT_BATCH_SIZE = 10


@register_dataset("perm-mnist")
class PermutedMNIST(PermutedPixels, _MNIST):
    """Domain-IL MNIST: every task shuffles the pixels by its own fixed permutation."""

    SETTING = "domain-il"
    N_TASKS = 20
    DEFAULT_BATCH_SIZE = 128



@register_dataset("rot-mnist")
class RotatedMNIST(_MNIST):
    """Domain-IL MNIST: every task rotates the images by its own fixed angle in [0, 180) degrees."""

    SETTING = "domain-il"
    N_TASKS = 20
    DEFAULT_BATCH_SIZE = 128

    def angle(self, task: int) -> float:
        """The task's rotation angle in degrees (counter-clockwise)."""
        return float(np.random.default_rng([self.args.seed, ROTATION_STREAM, task]).uniform(0.0, 180.0))

    def task_transform(self, task: int, images: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2.functional import rotate

        # Nearest interpolation, as Mammoth's PIL rotation: pixel values stay the original ones.
        return rotate(images, self.angle(task))
