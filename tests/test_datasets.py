"""The dataset contract on seq-digits (tasks, class order, permuted classes, label noise, task counts) and
the batched augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets._augment import random_crop, random_flip
from tests.conftest import build_dataset as build, shift_matches
from utils.errors import ConfigError


@pytest.fixture(scope="module")
def digits_labels():
    """Original labels of seq-digits' train and test rows (identity class order)."""
    dataset = build("seq-digits", "unused")
    return dataset.train.labels.numpy(), dataset.test.labels.numpy()


def assert_tasks_follow(dataset, order: list[int], originals) -> None:
    position = np.argsort(order)
    for t in range(5):
        for split, labels in ((dataset.train_split(t), originals[0]), (dataset.test_split(t), originals[1])):
            expected = np.flatnonzero(np.isin(labels, order[2 * t: 2 * t + 2]))
            assert split.indices.tolist() == expected.tolist()
            assert split.labels.tolist() == position[labels[expected]].tolist()


def test_class_order_remaps_labels_into_tasks(digits_labels):
    order = [3, 7, 0, 9, 1, 5, 2, 8, 4, 6]
    dataset = build("seq-digits", "unused", class_order=",".join(map(str, order)))
    assert dataset.class_order.tolist() == order
    assert_tasks_follow(dataset, order, digits_labels)
    for bad in ("1,2,3", "0,0,1,2,3,4,5,6,7,8", "a,b"):
        with pytest.raises(ConfigError, match="--class_order"):
            build("seq-digits", "unused", class_order=bad)


def test_permute_classes_is_a_seeded_permutation(digits_labels):
    dataset = build("seq-digits", "unused", permute_classes=True, seed=4)
    order = dataset.class_order.tolist()
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert order == build("seq-digits", "unused", permute_classes=True, seed=4).class_order.tolist()
    assert order != build("seq-digits", "unused", permute_classes=True, seed=5).class_order.tolist()
    assert_tasks_follow(dataset, order, digits_labels)


def test_label_noise_relabels_exactly_the_masked_examples_within_their_task():
    dataset = build("seq-digits", "unused", label_noise=0.1, seed=3)
    clean, noisy = dataset.clean_train_labels, dataset.train.labels.numpy()
    n = len(clean)
    assert dataset.noisy_mask.sum() == round(0.1 * n)
    assert np.array_equal(clean != noisy, dataset.noisy_mask)  # changed exactly where recorded
    assert np.array_equal(clean // 2, noisy // 2)  # every new label is in the same task
    again = build("seq-digits", "unused", label_noise=0.1, seed=3)
    assert np.array_equal(again.noisy_mask, dataset.noisy_mask)
    assert torch.equal(again.train.labels, dataset.train.labels)
    assert not np.array_equal(build("seq-digits", "unused", label_noise=0.1, seed=4).noisy_mask, dataset.noisy_mask)
    assert torch.equal(dataset.test.labels, build("seq-digits", "unused").test.labels)  # test labels stay clean


@pytest.mark.parametrize("n_tasks, message", [(3, "do not split evenly"), (11, "at most 10"), (-1, "at least 1")])
def test_impossible_task_counts_are_config_errors(n_tasks, message):
    with pytest.raises(ConfigError, match=message):
        build("seq-digits", "unused", n_tasks=n_tasks)


def test_n_tasks_override_splits_the_classes_evenly(digits_labels):
    dataset = build("seq-digits", "unused", n_tasks=2)
    assert [list(dataset.task_classes(t)) for t in range(2)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert dataset.train_split(1).indices.tolist() == np.flatnonzero(digits_labels[0] >= 5).tolist()


# -- batched augmentation ---------------------------------------------------------------------------------
def test_random_crop_only_translates():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (300, 3, 8, 8), dtype=torch.uint8)  # nonzero, so padding is recognisable
    out = random_crop(images, 2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    matches = shift_matches(out, images, 2)
    assert (matches.sum(1) == 1).all()  # each output is exactly one translation of its input
    assert matches.any(0).all()  # and all 25 shifts occur


def test_random_flip_mirrors_exactly():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (200, 3, 5, 7), dtype=torch.uint8)
    out = random_flip(images)
    mirrored = (out == images[..., torch.arange(6, -1, -1)]).flatten(1).all(1)
    same = (out == images).flatten(1).all(1)
    assert (mirrored | same).all() and 60 < mirrored.sum() < 140
