"""seq-tinyimg: Tiny ImageNet (200 classes, 64×64) from its standard folder release, cached as uint8 arrays."""
from __future__ import annotations

import os
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from datasets import ContinualDataset, download_release, register_dataset, require_files
from utils.errors import ConfigError

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
FOLDER = "tiny-imagenet-200"
CACHE = "uint8_cache.npz"
N_CLASSES = 200


def _decode(path: str) -> np.ndarray:
    """One JPEG as uint8 [3, 64, 64]; a few of the release's images are grayscale, hence the RGB conversion."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except OSError as error:
        raise ConfigError(f"{path} cannot be decoded ({error}); download Tiny ImageNet again") from None
    if array.shape != (64, 64, 3):
        raise ConfigError(f"{path} is {array.shape[1]}×{array.shape[0]}, not 64×64; download Tiny ImageNet again")
    return array.transpose(2, 0, 1)


def _decode_all(paths: list[str]) -> np.ndarray:
    images = np.empty((len(paths), 3, 64, 64), np.uint8)  # filled in place: no second copy of 1.2 GB
    # PIL releases the GIL while decoding, so threads give a real speed-up on the 110k files.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, image in enumerate(pool.map(_decode, paths)):
            images[i] = image
    return images


def _read_release(root: str) -> dict[str, np.ndarray]:
    """Decode the folder release: train classes in wnids.txt order, files sorted by name; val as test."""
    with open(os.path.join(root, "wnids.txt")) as f:
        wnids = [line.strip() for line in f if line.strip()]
    if len(wnids) != N_CLASSES or len(set(wnids)) != N_CLASSES:
        raise ConfigError(
            f"{root}/wnids.txt lists {len(wnids)} classes instead of 200 distinct ones; download it again"
        )
    require_files("Tiny ImageNet", os.path.join(root, "train"), [f"{w}/images" for w in wnids])
    train_paths, train_labels = [], []
    for label, wnid in enumerate(wnids):
        folder = os.path.join(root, "train", wnid, "images")
        names = sorted(n for n in os.listdir(folder) if n.endswith(".JPEG"))
        train_paths += [os.path.join(folder, n) for n in names]
        train_labels += [label] * len(names)
    label_of = {w: i for i, w in enumerate(wnids)}
    annotations = {}
    with open(os.path.join(root, "val", "val_annotations.txt")) as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2 or fields[1] not in label_of:
                raise ConfigError(f"{root}/val/val_annotations.txt has a line {line.strip()!r} without a known wnid; "
                                  f"download Tiny ImageNet again")
            annotations[fields[0]] = label_of[fields[1]]
    val_folder = os.path.join(root, "val", "images")
    val_names = sorted(n for n in os.listdir(val_folder) if n.endswith(".JPEG"))
    unlabelled = [n for n in val_names if n not in annotations]
    if unlabelled:
        raise ConfigError(
            f"{val_folder}/{unlabelled[0]} has no line in val_annotations.txt; download Tiny ImageNet again"
        )
    return {
        "train_x": _decode_all(train_paths),
        "train_y": np.array(train_labels, dtype=np.int64),
        "test_x": _decode_all([os.path.join(val_folder, n) for n in val_names]),
        "test_y": np.array([annotations[n] for n in val_names], dtype=np.int64),
    }


def _read_cache(path: str) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the cache is unreadable (it is rebuilt from the JPEGs then)."""
    try:
        with np.load(path, allow_pickle=False) as cache:
            return {k: cache[k] for k in ("train_x", "train_y", "test_x", "test_y")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None


def _write_cache(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write the cache under a temporary name and rename it, so readers never see a half-written one."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as f:  # a file object, so np.savez does not append ".npz" to the name
            np.savez(f, **arrays)
        os.replace(temporary, path)
    except OSError as error:  # a read-only dataset folder: the run goes on, only the next start is slower
        warnings.warn(f"could not write the Tiny ImageNet cache {path} ({error}); the next run decodes the JPEGs again")
        if os.path.exists(temporary):
            os.remove(temporary)


def load_tinyimagenet(data_path: str, download: bool) -> tuple[np.ndarray, ...]:
    """Train and val (as test) arrays, from the cache when it is at least as new as wnids.txt."""
    root = os.path.join(data_path, FOLDER)
    expected = ["wnids.txt", "train", "val/images", "val/val_annotations.txt"]
    if download and not all(os.path.exists(os.path.join(root, f)) for f in expected):
        from torchvision.datasets.utils import download_and_extract_archive

        download_release("Tiny ImageNet", root, lambda: download_and_extract_archive(URL, data_path))
    require_files("Tiny ImageNet", root, expected)
    cache_path = os.path.join(root, CACHE)
    arrays = None
    if os.path.exists(cache_path) and os.path.getmtime(cache_path) >= os.path.getmtime(os.path.join(root, "wnids.txt")):
        arrays = _read_cache(cache_path)
    if arrays is None:
        arrays = _read_release(root)
        _write_cache(cache_path, arrays)
    return arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"]


@register_dataset("seq-tinyimg")
class SequentialTinyImageNet(ContinualDataset):
    """Tiny ImageNet as 10 tasks × 20 classes, with Mammoth's crop-and-flip augmentation."""

    SETTING = "class-il"
    N_CLASSES = N_CLASSES
    N_TASKS = 10
    SHAPE = (3, 64, 64)
    MEAN = (0.4802, 0.4480, 0.3975)
    STD = (0.2770, 0.2691, 0.2821)
    CROP_PADDING = 4
    FLIP = True
    DEFAULT_BACKBONE = "resnet18"
    DEFAULT_BATCH_SIZE = 32
    DEFAULT_N_EPOCHS = 100

    def load(self, data_path, download):
        return load_tinyimagenet(data_path, download)
