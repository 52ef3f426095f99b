"""Long-stream datasets (continual-imagenet, random labels, perm-digits) on tiny files in the real formats."""
from __future__ import annotations

import argparse
import shutil

import numpy as np
import pytest
import torch

from datasets import DATASETS
from datasets.continual_imagenet import TRAIN_FILES, ContinualImageNet, task_pairs
from datasets.digits import load_digits_split
from tests.conftest import dataset_args as make_args
from tests.test_dataset_files import write_idx, write_pickle
from utils.errors import ConfigError

IMAGENET_DEFAULTS = dict(imagenet_protocol="vit", imagenet_train_per_class=2, imagenet_test_per_class=1)


def build(name: str, data_path, **overrides):
    return DATASETS.get(name)(make_args(data_path, **overrides))


# -- continual-imagenet (Imagenet32 npz files) ------------------------------------------------------------
@pytest.fixture(scope="module")
def imagenet32(tmp_path_factory):
    """All 1000 classes, 3 training images each over the 10 batches and 2 validation images each, shuffled."""
    root = tmp_path_factory.mktemp("imagenet")
    folder = root / "imagenet32"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train_y = rng.permutation(np.repeat(np.arange(1, 1001), 3))  # 1-based, as in the release
    train_x = rng.integers(0, 256, (3000, 3072), dtype=np.uint8)
    for i, name in enumerate(TRAIN_FILES):
        rows = slice(300 * i, 300 * (i + 1))
        save = np.savez_compressed if i % 2 else np.savez  # the loader must not care
        save(folder / name, data=train_x[rows], labels=train_y[rows], mean=train_x[rows].mean(0))
    val_y = rng.permutation(np.repeat(np.arange(1, 1001), 2))
    val_x = rng.integers(0, 256, (2000, 3072), dtype=np.uint8)
    np.savez(folder / "val_data.npz", data=val_x, labels=val_y)
    return root, train_x.reshape(-1, 3, 32, 32), train_y - 1, val_x.reshape(-1, 3, 32, 32), val_y - 1


def first_rows(classes: np.ndarray, wanted: tuple[int, int], per_class: int) -> np.ndarray:
    """Release rows of the first `per_class` images of each wanted class, in file order."""
    return np.sort(np.concatenate([np.flatnonzero(classes == c)[:per_class] for c in wanted]))


def assert_pair_splits(dataset, train_x, train_y, val_x, val_y, train_per_class: int, test_per_class: int) -> None:
    """Task t holds exactly the first images of its two classes, labelled 0 / 1, as rows of the stored arrays."""
    for t, (a, b) in enumerate(dataset.task_pairs):
        for split, stored, release_rows, x, y, k in (
                (dataset.train_split(t), dataset.train, dataset.train_release_rows, train_x, train_y, train_per_class),
                (dataset.test_split(t), dataset.test, dataset.test_release_rows, val_x, val_y, test_per_class)):
            expected = first_rows(y, (a, b), k)
            assert len(split) == 2 * k
            assert release_rows[split.indices.numpy()].tolist() == expected.tolist()
            assert np.array_equal(split.images.numpy(), x[expected])
            assert torch.equal(stored.images[split.indices], split.images)
            assert split.labels.tolist() == (y[expected] == b).astype(int).tolist()


def test_vit_protocol_pairs_two_disjoint_seeded_families(imagenet32):
    root, train_x, train_y, val_x, val_y = imagenet32
    dataset = build("continual-imagenet", root, n_tasks=6, **IMAGENET_DEFAULTS)
    assert (dataset.SETTING, dataset.N_CLASSES, dataset.seen_classes(5), list(dataset.task_classes(3))) == \
           ("domain-il", 2, 2, [0, 1])
    assert dataset.n_tasks == 6 and dataset.task_pairs.shape == (6, 2)
    assert_pair_splits(dataset, train_x, train_y, val_x, val_y, 2, 1)
    # Only the 12 classes the 6 tasks use are kept, 2 training and 1 test image each.
    assert len(dataset.train) == 24 and len(dataset.test) == 12
    assert sorted(dataset.train_classes.tolist()) == sorted(np.repeat(dataset.task_pairs.flatten(), 2).tolist())
    assert dataset.class_order.tolist() == dataset.task_pairs.flatten().tolist()
    assert dataset.train.labels.tolist() == np.isin(dataset.train_classes, dataset.task_pairs[:, 1]).astype(int).tolist()
    # The whole stream: two families of 500, disjoint, each class in exactly one task; a seeded split.
    pairs = task_pairs("vit", 0, 500)
    order = np.random.default_rng([0, 13, 0]).permutation(1000)
    assert pairs[:, 0].tolist() == order[:500].tolist() and pairs[:, 1].tolist() == order[500:].tolist()
    assert sorted(pairs.flatten().tolist()) == list(range(1000))
    assert np.array_equal(dataset.task_pairs, pairs[:6])
    assert np.array_equal(task_pairs("vit", 0, 500), pairs)
    assert not np.array_equal(task_pairs("vit", 1, 500), pairs)
    assert not np.array_equal(build("continual-imagenet", root, n_tasks=6, seed=1, **IMAGENET_DEFAULTS).task_pairs,
                              dataset.task_pairs)


def test_cnn_protocol_pairs_consecutive_classes_of_a_seeded_order(imagenet32):
    root, train_x, train_y, val_x, val_y = imagenet32
    options = {**IMAGENET_DEFAULTS, "imagenet_protocol": "cnn", "imagenet_train_per_class": 3,
               "imagenet_test_per_class": 2}
    dataset = build("continual-imagenet", root, n_tasks=4, seed=5, **options)
    order = np.random.default_rng([5, 13, 0]).permutation(1000)
    assert dataset.task_pairs.tolist() == order[:8].reshape(4, 2).tolist()
    assert_pair_splits(dataset, train_x, train_y, val_x, val_y, 3, 2)
    # 500 distinct pairs cover every class once; task 500 starts a fresh permutation.
    pairs = task_pairs("cnn", 5, 501)
    assert sorted(pairs[:500].flatten().tolist()) == list(range(1000))
    assert pairs[500].tolist() == np.random.default_rng([5, 13, 1]).permutation(1000)[:2].tolist()


def test_label_noise_flips_the_masked_rows_in_their_tasks(imagenet32):
    root, *_ = imagenet32
    dataset = build("continual-imagenet", root, n_tasks=10, label_noise=0.25, **IMAGENET_DEFAULTS)
    assert dataset.noisy_mask.sum() == 10  # round(0.25 · 40 rows)
    assert np.array_equal(dataset.train.labels.numpy() != dataset.clean_train_labels, dataset.noisy_mask)
    for t in range(10):
        split = dataset.train_split(t)
        clean = (dataset.train_classes[split.indices.numpy()] == dataset.task_pairs[t, 1]).astype(int)
        assert split.labels.tolist() == (clean ^ dataset.noisy_mask[split.indices.numpy()]).tolist()
        test = dataset.test_split(t)
        assert test.labels.tolist() == (dataset.test_classes[test.indices.numpy()] == dataset.task_pairs[t, 1]).tolist()


def test_imagenet_flags_defaults_and_impossible_requests(imagenet32):
    root, *_ = imagenet32
    parser = argparse.ArgumentParser()
    ContinualImageNet.add_args(parser)
    assert vars(parser.parse_args([])) == dict(imagenet_protocol="vit", imagenet_train_per_class=600,
                                               imagenet_test_per_class=50)
    assert (ContinualImageNet.N_TASKS, ContinualImageNet.DEFAULT_BACKBONE, ContinualImageNet.DEFAULT_BATCH_SIZE,
            ContinualImageNet.DEFAULT_N_EPOCHS, ContinualImageNet.LONG_STREAM) == (500, "vit", 100, 10, True)
    with pytest.raises(ConfigError, match="at most 500 tasks; pass --n_tasks of at most 500"):
        build("continual-imagenet", root, n_tasks=501, **IMAGENET_DEFAULTS)
    with pytest.raises(ConfigError, match="only 3 images of class .*pass --imagenet_train_per_class of at most 3"):
        build("continual-imagenet", root, n_tasks=2, **{**IMAGENET_DEFAULTS, "imagenet_train_per_class": 4})
    with pytest.raises(ConfigError, match="class .* in val_data.npz .*pass --imagenet_test_per_class of at most 2"):
        build("continual-imagenet", root, n_tasks=2, **{**IMAGENET_DEFAULTS, "imagenet_test_per_class": 3})
    with pytest.raises(ConfigError, match="--class_order and --permute_classes do not apply"):
        build("continual-imagenet", root, n_tasks=2, permute_classes=True, **IMAGENET_DEFAULTS)


def test_imagenet_missing_and_corrupt_files_name_the_file(imagenet32, tmp_path):
    root, *_ = imagenet32
    folder = tmp_path / "imagenet32"
    shutil.copytree(root / "imagenet32", folder)
    (folder / "val_data.npz").unlink()
    (folder / "train_data_batch_7.npz").unlink()
    with pytest.raises(ConfigError) as error:
        build("continual-imagenet", tmp_path, n_tasks=2, **IMAGENET_DEFAULTS)
    message = str(error.value)
    assert "missing train_data_batch_7.npz, val_data.npz" in message and str(folder) in message
    assert "Imagenet32" in message and "image-net.org" in message and "--download" not in message
    shutil.copy(root / "imagenet32" / "val_data.npz", folder)
    shutil.copy(root / "imagenet32" / "train_data_batch_7.npz", folder)
    path = folder / "train_data_batch_1.npz"
    corruptions = {  # what is written → what the sentence says
        "wrong_key": (lambda: np.savez(path, images=np.zeros((3, 3072), np.uint8), labels=np.ones(3, int)), "lacks"),
        "wrong_shape": (lambda: np.savez(path, data=np.zeros((3, 1024), np.uint8), labels=np.ones(3, int)), "lacks"),
        "label_zero": (lambda: np.savez(path, data=np.zeros((3, 3072), np.uint8), labels=np.arange(3)), "lacks"),
        "truncated": (lambda: path.write_bytes((root / "imagenet32" / path.name).read_bytes()[:5000]), "cannot be read"),
        "pickled": (lambda: np.savez(path, data=np.array([{"a": 1}], dtype=object), labels=np.ones(1, int)),
                    "cannot be read"),
    }
    for write, sentence in corruptions.values():
        write()
        with pytest.raises(ConfigError, match=f"train_data_batch_1.npz {sentence}.*download it again"):
            build("continual-imagenet", tmp_path, n_tasks=2, **IMAGENET_DEFAULTS)


# -- random-label streams -----------------------------------------------------------------------------------
def write_mnist(data_path, images: np.ndarray) -> np.ndarray:
    """The four MNIST idx files, with `images` as both the training and the test images."""
    folder = data_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    labels = np.arange(len(images)) % 10
    for split in ("train", "t10k"):
        write_idx(folder / f"{split}-images-idx3-ubyte", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels)
    return images


def assert_random_label_stream(dataset, images: np.ndarray, seed: int) -> None:
    """Fixed images, task t labelled by the seeded generator [seed, 12, t], test split = training split."""
    n = len(images)
    assert (dataset.SETTING, dataset.N_CLASSES, dataset.LONG_STREAM, dataset.n_tasks) == ("domain-il", 10, True, 50)
    labels = []
    for t in range(4):
        split, test = dataset.train_split(t), dataset.test_split(t)
        expected = np.random.default_rng([seed, 12, t]).integers(0, 10, n)
        assert split.labels.tolist() == expected.tolist()
        assert np.array_equal(split.images.numpy(), images) and split.indices.tolist() == list(range(n))
        assert torch.equal(test.images, split.images) and torch.equal(test.labels, split.labels)
        assert torch.equal(test.indices, split.indices)
        labels.append(split.labels)
    assert all(not torch.equal(labels[0], other) for other in labels[1:])


def test_random_label_digits_relabels_a_fixed_image_set(tmp_path):
    dataset = build("random-label-digits", tmp_path, random_label_examples=100, seed=3)
    assert_random_label_stream(dataset, load_digits_split()[0][:100], seed=3)
    other = build("random-label-digits", tmp_path, random_label_examples=100, seed=4)
    assert not torch.equal(other.train_split(0).labels, dataset.train_split(0).labels)
    assert torch.equal(build("random-label-digits", tmp_path, random_label_examples=100, seed=3).train_split(2).labels,
                       dataset.train_split(2).labels)
    assert (dataset.DEFAULT_BACKBONE, dataset.DEFAULT_BATCH_SIZE) == ("mlp", 50)
    with pytest.raises(ConfigError, match="between 1 and random-label-digits's 1438"):
        build("random-label-digits", tmp_path, random_label_examples=2000)
    for flag in (dict(label_noise=0.1), dict(class_order="1,0,2,3,4,5,6,7,8,9"), dict(permute_classes=True)):
        with pytest.raises(ConfigError, match="does not apply to random-label-digits"):
            build("random-label-digits", tmp_path, random_label_examples=100, **flag)


def test_random_label_mnist_and_cifar10_reuse_their_loaders(tmp_path):
    rng = np.random.default_rng(0)
    train_x = write_mnist(tmp_path, rng.integers(0, 256, (30, 28, 28), dtype=np.uint8))
    assert_random_label_stream(build("random-label-mnist", tmp_path, random_label_examples=20, seed=1),
                               train_x[:20, None], seed=1)
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    batches = [rng.integers(0, 256, (10, 3072), dtype=np.uint8) for _ in range(6)]
    for name, data in zip([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], batches):
        write_pickle(cifar / name, {"data": data, "labels": list(range(10))})
    dataset = build("random-label-cifar10", tmp_path, random_label_examples=15, seed=2)
    assert_random_label_stream(dataset, np.concatenate(batches[:2]).reshape(-1, 3, 32, 32)[:15], seed=2)
    assert (dataset.DEFAULT_BACKBONE, dataset.CROP_PADDING, dataset.FLIP) == ("reduced_resnet18", 0, False)


# -- perm-digits and perm-mnist -------------------------------------------------------------------------------
def test_perm_digits_permutes_the_64_pixels_per_task(tmp_path):
    dataset = build("perm-digits", tmp_path, seed=7)
    assert (dataset.SETTING, dataset.n_tasks, dataset.LONG_STREAM) == ("domain-il", 50, True)
    assert (dataset.DEFAULT_BATCH_SIZE, dataset.DEFAULT_N_EPOCHS, dataset.DEFAULT_BACKBONE) == (32, 5, "mlp")
    perms = [dataset.permutation(t) for t in range(50)]
    assert all(sorted(p.tolist()) == list(range(64)) for p in perms)
    assert not torch.equal(perms[0], perms[1]) and len({tuple(p.tolist()) for p in perms}) == 50
    assert all(torch.equal(p, build("perm-digits", tmp_path, seed=7).permutation(t)) for t, p in enumerate(perms))
    assert not torch.equal(build("perm-digits", tmp_path, seed=8).permutation(0), perms[0])
    train_x, train_y, test_x, _ = load_digits_split()
    for t in (0, 9):
        split = dataset.train_split(t)
        assert np.array_equal(split.images.reshape(-1, 64).numpy(), train_x.reshape(-1, 64)[:, perms[t].numpy()])
        assert split.labels.tolist() == train_y.tolist() and split.indices.tolist() == list(range(len(train_y)))
        test = dataset.test_split(t).images.reshape(-1, 64).numpy()
        assert np.array_equal(test, test_x.reshape(-1, 64)[:, perms[t].numpy()])


def test_perm_mnist_permutations_are_unchanged(tmp_path):
    images = write_mnist(tmp_path, np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8))
    dataset = build("perm-mnist", tmp_path, seed=11)
    for t in (0, 1, 19):
        expected = np.random.default_rng([11, 10, t]).permutation(784)
        assert dataset.permutation(t).tolist() == expected.tolist()
        assert np.array_equal(dataset.train_split(t).images.reshape(4, 784).numpy(), images.reshape(4, 784)[:, expected])
