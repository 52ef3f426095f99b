"""Datasets read from tiny files in the exact on-disk formats of the real releases: MNIST idx files, CIFAR
pickles, the Tiny ImageNet folder of JPEGs, and the transforms of a dataset read that way."""
from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import build_dataset as build, shift_matches
from utils.errors import ConfigError


def assert_class_il_splits(dataset, train_y: np.ndarray, test_y: np.ndarray, per_task: int) -> None:
    """Task t holds exactly the examples of classes t·per_task … (t+1)·per_task − 1, in dataset order."""
    for t in range(dataset.n_tasks):
        for split, labels in ((dataset.train_split(t), train_y), (dataset.test_split(t), test_y)):
            expected = np.flatnonzero(labels // per_task == t)
            assert split.indices.tolist() == expected.tolist()
            assert split.labels.tolist() == labels[expected].tolist()


# -- MNIST (idx files) -------------------------------------------------------------------------------
MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def write_idx(path, array: np.ndarray) -> None:
    """The idx format: 0, 0, 0x08 (unsigned byte), ndim; big-endian uint32 dims; raw bytes."""
    with open(path, "wb") as f:
        f.write(bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist(tmp_path):
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    train_y = rng.permutation(np.arange(30) % 10)
    test_x = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    test_y = rng.permutation(np.arange(20) % 10)
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    for name, array in zip(MNIST_NAMES, (train_x, train_y, test_x, test_y)):
        write_idx(folder / name, array)
    return train_x, train_y, test_x, test_y


def test_seq_mnist_round_trips_pixels_labels_and_tasks(mnist, tmp_path):
    train_x, train_y, test_x, test_y = mnist
    dataset = build("seq-mnist", tmp_path)
    assert dataset.train.images.dtype == torch.uint8 and dataset.train.images.shape == (30, 1, 28, 28)
    assert dataset.train.labels.dtype == torch.int64
    assert np.array_equal(dataset.train.images[:, 0].numpy(), train_x)
    assert np.array_equal(dataset.test.images[:, 0].numpy(), test_x)
    assert dataset.train.labels.tolist() == train_y.tolist() and dataset.test.labels.tolist() == test_y.tolist()
    assert dataset.train.indices.tolist() == list(range(30))
    defaults = (dataset.DEFAULT_BACKBONE, dataset.DEFAULT_BATCH_SIZE, dataset.DEFAULT_N_EPOCHS)
    assert dataset.n_tasks == 5 and defaults == ("mlp", 10, 1)
    assert_class_il_splits(dataset, train_y, test_y, per_task=2)
    # No normalisation: floats are pixels / 255.
    assert torch.equal(dataset.test_transform(dataset.train.images[:2]), dataset.train.images[:2].float() / 255)


def test_perm_mnist_uses_a_fixed_bijection_per_task(mnist, tmp_path):
    train_x, train_y, _, _ = mnist
    dataset = build("perm-mnist", tmp_path)
    assert (dataset.SETTING, dataset.n_tasks, dataset.DEFAULT_BATCH_SIZE) == ("domain-il", 20, 128)
    perms = [dataset.permutation(t) for t in range(20)]
    for perm in perms:
        assert sorted(perm.tolist()) == list(range(784))
    assert len({tuple(p.tolist()) for p in perms}) == 20  # every task differs
    again = build("perm-mnist", tmp_path)
    assert all(torch.equal(dataset.permutation(t), again.permutation(t)) for t in range(20))
    assert not torch.equal(build("perm-mnist", tmp_path, seed=1).permutation(3), perms[3])

    split = dataset.train_split(3)
    flat = train_x.reshape(30, 784)
    assert split.images.shape == (30, 1, 28, 28)
    assert np.array_equal(split.images.reshape(30, 784).numpy(), flat[:, perms[3].numpy()])
    assert np.array_equal(np.sort(split.images.reshape(30, 784).numpy(), 1), np.sort(flat, 1))  # same pixels
    assert split.labels.tolist() == train_y.tolist() and split.indices.tolist() == list(range(30))
    assert torch.equal(dataset.test_split(3).images, dataset.task_transform(3, dataset.test.images))


def test_rot_mnist_rotates_by_the_drawn_angle(mnist, tmp_path):
    dataset = build("rot-mnist", tmp_path)
    angles = [dataset.angle(t) for t in range(20)]
    assert all(0 <= a < 180 for a in angles) and len(set(angles)) == 20
    assert angles == [build("rot-mnist", tmp_path).angle(t) for t in range(20)]
    # A bright 3×3 blob right of the centre must move counter-clockwise by the task's angle.
    blob = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    blob[:, :, 12:15, 20:23] = 200
    for t in (0, 1, 7):
        rotated = dataset.task_transform(t, blob)
        assert rotated.dtype == torch.uint8 and set(rotated.unique().tolist()) <= {0, 200}  # nearest: no blur
        ys, xs = torch.nonzero(rotated[0, 0], as_tuple=True)
        # Counter-clockwise on screen (rows grow downwards) about the image centre (13.5, 13.5).
        theta, dx, dy = np.deg2rad(angles[t]), 21 - 13.5, 13 - 13.5
        expected_x = 13.5 + dx * np.cos(theta) + dy * np.sin(theta)
        expected_y = 13.5 - dx * np.sin(theta) + dy * np.cos(theta)
        assert abs(xs.float().mean().item() - expected_x) < 0.5 and abs(ys.float().mean().item() - expected_y) < 0.5
        assert torch.equal(rotated[0], rotated[1])  # the whole batch turns by the same angle
    split = dataset.train_split(5)
    assert torch.equal(split.images, dataset.task_transform(5, dataset.train.images))
    assert split.indices.tolist() == list(range(30))


def test_mnist_missing_files_name_the_file_and_folder(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    write_idx(folder / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(ConfigError) as error:
        build("seq-mnist", tmp_path)
    message = str(error.value)
    assert "t10k-labels-idx1-ubyte" in message and str(folder) in message
    assert "train-images-idx3-ubyte" not in message


@pytest.mark.parametrize("corruption", ["truncated", "bad_magic"])
def test_corrupt_idx_file_is_a_config_error(mnist, tmp_path, corruption):
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    raw = path.read_bytes()
    path.write_bytes(raw[:-100] if corruption == "truncated" else b"\x00\x00\x09\x03" + raw[4:])
    with pytest.raises(ConfigError, match="train-images-idx3-ubyte.*download it again"):
        build("seq-mnist", tmp_path)


# -- CIFAR (python pickles) ----------------------------------------------------------------------------
class Py2Pickler(pickle._Pickler):
    """Writes bytes with Python 2's str opcodes and numpy's old module name, as the real release does."""

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def write_pickle(path, batch: dict, style: str = "py3") -> None:
    if style == "py2":  # str keys are Python 2 byte strings; numpy lives in numpy.core
        import io

        buffer = io.BytesIO()
        Py2Pickler(buffer, protocol=2).dump({k.encode(): v for k, v in batch.items()})
        path.write_bytes(buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    elif style == "bytes_keys":
        path.write_bytes(pickle.dumps({k.encode(): v for k, v in batch.items()}, protocol=2))
    else:
        path.write_bytes(pickle.dumps(batch))


@pytest.fixture
def cifar10(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = []
    styles = ["py2", "py3", "bytes_keys", "py2", "py3", "py2"]
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
        labels = rng.permutation(10)
        write_pickle(folder / name, {"batch_label": name, "data": data, "labels": labels.tolist()}, styles[i])
        batches.append((data, labels))
    train_x = np.concatenate([b[0] for b in batches[:5]]).reshape(-1, 3, 32, 32)
    train_y = np.concatenate([b[1] for b in batches[:5]])
    return train_x, train_y, batches[5][0].reshape(-1, 3, 32, 32), batches[5][1]


def test_seq_cifar10_reads_all_pickle_styles_in_release_order(cifar10, tmp_path):
    train_x, train_y, test_x, test_y = cifar10
    dataset = build("seq-cifar10", tmp_path)
    assert dataset.train.images.shape == (50, 3, 32, 32) and dataset.train.images.dtype == torch.uint8
    assert np.array_equal(dataset.train.images.numpy(), train_x) and np.array_equal(dataset.test.images.numpy(), test_x)
    assert dataset.train.labels.tolist() == train_y.tolist() and dataset.test.labels.tolist() == test_y.tolist()
    assert (dataset.n_tasks, dataset.CROP_PADDING, dataset.FLIP, dataset.DEFAULT_BACKBONE) == (5, 4, True, "resnet18")
    assert (dataset.DEFAULT_BATCH_SIZE, dataset.DEFAULT_N_EPOCHS) == (32, 50)
    assert_class_il_splits(dataset, train_y, test_y, per_task=2)


def test_seq_cifar100_uses_fine_labels_and_ten_tasks(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    arrays = {}
    for name, n in (("train", 200), ("test", 100)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.permutation(np.arange(n) % 100)
        write_pickle(folder / name, {"data": data, "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist()},
                     "py2" if name == "train" else "py3")
        arrays[name] = (data.reshape(-1, 3, 32, 32), fine)
    dataset = build("seq-cifar100", tmp_path)
    assert np.array_equal(dataset.train.images.numpy(), arrays["train"][0])
    assert dataset.train.labels.tolist() == arrays["train"][1].tolist()
    assert dataset.test.labels.tolist() == arrays["test"][1].tolist()
    assert dataset.n_tasks == 10 and dataset.MEAN == (0.5071, 0.4865, 0.4409)
    assert_class_il_splits(dataset, arrays["train"][1], arrays["test"][1], per_task=10)


class RunsShell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_cifar_pickle_with_a_disallowed_global_is_refused(cifar10, tmp_path):
    marker = tmp_path / "pwned"
    evil = {"data": RunsShell(f"touch {marker}"), "labels": []}
    write_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_3", evil)
    with pytest.raises(ConfigError, match=r"data_batch_3 refers to (posix|nt|os)\.system"):
        build("seq-cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_garbage_and_missing_files_are_config_errors(cifar10, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:200])
    with pytest.raises(ConfigError, match="test_batch cannot be read.*download it again"):
        build("seq-cifar10", tmp_path)
    os.remove(folder / "test_batch")
    os.remove(folder / "data_batch_4")
    with pytest.raises(ConfigError) as error:
        build("seq-cifar10", tmp_path)
    assert "data_batch_4, test_batch" in str(error.value) and str(folder) in str(error.value)
    with pytest.raises(ConfigError, match="cifar-100-python.*missing train, test"):
        build("seq-cifar100", tmp_path)


def test_train_transform_normalises_with_the_dataset_statistics(cifar10, tmp_path):
    dataset = build("seq-cifar10", tmp_path)
    mean, std = torch.tensor(dataset.MEAN).view(3, 1, 1), torch.tensor(dataset.STD).view(3, 1, 1)
    images = dataset.train.images.clamp(min=1)  # nonzero, so padding is recognisable
    expected = (images.float() / 255 - mean) / std
    assert torch.allclose(dataset.test_transform(images), expected, atol=1e-6)
    torch.manual_seed(0)
    out = dataset.train_transform(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    pixels = ((out * std + mean) * 255).round().to(torch.uint8)  # undo the normalisation
    translated = shift_matches(pixels, images, 4) | shift_matches(pixels, images.flip(3), 4)
    assert translated.any(1).all()  # crop and flip only, then exactly the dataset's mean and std


# -- Tiny ImageNet (folder of JPEGs) ------------------------------------------------------------------
def color(label: int, i: int) -> tuple[int, int, int]:
    return (label, 255 - label, 40 + 50 * i)


@pytest.fixture
def tinyimg(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = [f"n{9000 - 7 * c:08d}" for c in range(200)]  # not sorted: class order must follow the file
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for label, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in (1, 0):  # written out of order: the loader sorts by file name
            image = Image.new("L", (64, 64), 77) if label == 5 else Image.new("RGB", (64, 64), color(label, i))
            image.save(folder / f"{wnid}_{i}.JPEG", quality=95)
        (folder / ".DS_Store").write_bytes(b"junk")  # not a JPEG: ignored
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    val = root / "val" / "images"
    val.mkdir(parents=True)
    val_labels = {f"val_{i}.JPEG": (13 * i) % 200 for i in range(12)}
    for name, label in reversed(list(val_labels.items())):
        Image.new("RGB", (64, 64), color(label, 2)).save(val / name, quality=95)
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"{n}\t{wnids[l]}\t0\t0\t63\t63\n" for n, l in val_labels.items()))
    order = sorted(val_labels)  # file-name order: val_0, val_1, val_10, val_11, val_2, ...
    return root, wnids, order, np.array([val_labels[n] for n in order])


def test_seq_tinyimg_reads_the_folder_release_in_order(tinyimg, tmp_path):
    root, wnids, val_order, val_y = tinyimg
    dataset = build("seq-tinyimg", tmp_path)
    train_y = np.repeat(np.arange(200), 2)
    assert dataset.train.images.shape == (400, 3, 64, 64) and dataset.test.images.shape == (12, 3, 64, 64)
    assert dataset.train.labels.tolist() == train_y.tolist() and dataset.test.labels.tolist() == val_y.tolist()
    paths = [root / "train" / w / "images" / f"{w}_{i}.JPEG" for w in wnids for i in (0, 1)]
    reference = [np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p in paths]
    assert np.array_equal(dataset.train.images.numpy(), np.stack(reference))  # exactly PIL's decoding
    images = dataset.train.images.numpy().astype(int)
    assert np.abs(images[20 * 2 + 1] - np.array(color(20, 1))[:, None, None]).max() <= 3  # channels in RGB order
    gray = images[5 * 2]  # class 5 is a grayscale JPEG: three equal channels
    assert (gray == gray[0]).all() and abs(gray[0, 0, 0] - 77) <= 2
    test = dataset.test.images.numpy().astype(int)
    assert all(np.abs(test[k] - np.array(color(val_y[k], 2))[:, None, None]).max() <= 3 for k in range(12))
    assert (dataset.n_tasks, dataset.SHAPE, dataset.DEFAULT_N_EPOCHS) == (10, (3, 64, 64), 100)
    assert_class_il_splits(dataset, train_y, val_y, per_task=20)


def test_seq_tinyimg_cache_is_used_until_wnids_is_newer(tinyimg, tmp_path):
    root, wnids, _, _ = tinyimg
    first = build("seq-tinyimg", tmp_path)
    cache = root / "uint8_cache.npz"
    with np.load(cache, allow_pickle=False) as arrays:
        assert np.array_equal(arrays["train_x"], first.train.images.numpy())
    assert [p.name for p in root.iterdir() if ".tmp" in p.name] == []
    # Change a JPEG behind the cache's back: the cache (newer than wnids.txt) still answers.
    Image.new("RGB", (64, 64), (255, 0, 0)).save(root / "train" / wnids[0] / "images" / f"{wnids[0]}_0.JPEG")
    os.utime(root / "wnids.txt", (1, 1))
    assert torch.equal(build("seq-tinyimg", tmp_path).train.images, first.train.images)
    # A wnids.txt newer than the cache invalidates it.
    later = os.path.getmtime(cache) + 10
    os.utime(root / "wnids.txt", (later, later))
    rebuilt = build("seq-tinyimg", tmp_path).train.images
    assert rebuilt[0, 0].float().mean() > 240 and torch.equal(rebuilt[1:], first.train.images[1:])


def test_seq_tinyimg_missing_and_bad_files(tinyimg, tmp_path):
    root, wnids, _, _ = tinyimg
    (root / "val" / "images" / "val_3.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(ConfigError, match="val_3.JPEG cannot be decoded"):
        build("seq-tinyimg", tmp_path)
    os.remove(root / "val" / "val_annotations.txt")
    with pytest.raises(ConfigError) as error:
        build("seq-tinyimg", tmp_path)
    assert "val/val_annotations.txt" in str(error.value) and str(root) in str(error.value)
    with pytest.raises(ConfigError, match="tiny-imagenet-200: missing wnids.txt"):
        build("seq-tinyimg", tmp_path / "elsewhere")
