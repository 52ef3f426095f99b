"""seq-cifar10 and seq-cifar100: the standard CIFAR python release, read with a restricted unpickler."""
from __future__ import annotations

import codecs
import os
import pickle

import numpy as np

from datasets import ContinualDataset, download_release, register_dataset, release_folder, require_files
from utils.errors import ConfigError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

# The only globals a CIFAR pickle refers to: numpy array reconstruction, and `_codecs.encode`, which
# Python 3 writes for bytes at protocol 2. Dicts and lists are opcodes and need no global.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}

# Per class count: release folder, train files, test files, label key. The release folder is read directly under
# --data_path (torchvision's root) or, as Mammoth keeps it, under <base_path>/CIFAR10 or <base_path>/CIFAR100.
RELEASES = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    100: ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays, dicts and lists, and refuses any other global."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")  # latin1: the release is a Python 2 pickle
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise ConfigError(
                f"{self.path} refers to {module}.{name}, which a CIFAR file never does; "
                f"it is not the standard release, so delete it and download it again"
            )
        return _ALLOWED[(module, name)]


def load_batch(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 [N, 3, 32, 32]) and labels (int64) of one CIFAR python batch file."""
    with open(path, "rb") as f:
        try:
            batch = _RestrictedUnpickler(f, path).load()
        except ConfigError:
            raise
        except Exception as error:  # truncated or garbage bytes raise many kinds of errors
            raise ConfigError(f"{path} cannot be read ({error}); delete it and download it again") from None
    if not isinstance(batch, dict):
        batch = {}
    # Python 2 str keys load as str; a file re-saved from Python 3 with encoding='bytes' has bytes keys.
    data = batch.get("data", batch.get(b"data"))
    labels = batch.get(label_key, batch.get(label_key.encode()))
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        labels = None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (3072,) \
            or labels is None or labels.shape != (len(data),):
        raise ConfigError(
            f"{path} lacks uint8 'data' of shape [N, 3072] with one {label_key!r} entry per row; "
            f"it is not the standard release, so download it again"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(data_path: str, download: bool, n_classes: int) -> tuple[np.ndarray, ...]:
    """Train and test arrays of CIFAR-10 or CIFAR-100 in the order of the release files."""
    release, train, test, label_key = RELEASES[n_classes]
    layouts = (release, os.path.join(f"CIFAR{n_classes}", release))
    folder = release_folder(data_path, layouts, train + test)
    if download and not all(os.path.exists(os.path.join(folder, f)) for f in train + test):
        import torchvision

        dataset = torchvision.datasets.CIFAR10 if n_classes == 10 else torchvision.datasets.CIFAR100
        download_release(f"CIFAR-{n_classes}", folder, lambda: dataset(root=data_path, download=True))
    require_files(f"CIFAR-{n_classes}", folder, train + test, also=layouts[1:])
    arrays = []
    for files in (train, test):
        batches = [load_batch(os.path.join(folder, f), label_key) for f in files]
        images, labels = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
        if len(labels) and not 0 <= labels.min() <= labels.max() < n_classes:
            raise ConfigError(f"labels in {folder} fall outside 0..{n_classes - 1}; download CIFAR-{n_classes} again")
        arrays += [images, labels]
    return tuple(arrays)


class _CIFAR(ContinualDataset):
    """Shared attributes of the CIFAR family: Mammoth's augmentation, ResNet-18, 50 epochs."""

    SETTING = "class-il"
    SHAPE = (3, 32, 32)
    CROP_PADDING = 4
    FLIP = True
    DEFAULT_BACKBONE = "resnet18"
    DEFAULT_BATCH_SIZE = 32
    DEFAULT_N_EPOCHS = 50

    def load(self, data_path, download):
        return load_cifar(data_path, download, self.N_CLASSES)


@register_dataset("seq-cifar10")
class SequentialCIFAR10(_CIFAR):
    """CIFAR-10 as 5 tasks × 2 classes."""

    N_CLASSES = 10
    N_TASKS = 5
    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2615)


@register_dataset("seq-cifar100")
class SequentialCIFAR100(_CIFAR):
    """CIFAR-100 (fine labels) as 10 tasks × 10 classes."""

    N_CLASSES = 100
    N_TASKS = 10
    MEAN = (0.5071, 0.4865, 0.4409)
    STD = (0.2673, 0.2564, 0.2762)
