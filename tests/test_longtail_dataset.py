"""seq-longtail and seq-longtail32: the composition of the synthetic long-tail data, its known answer, and the
memorization workflow (train_splits.py, then eval_splits.py) finding that answer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import eval_splits
import train_splits
from datasets.longtail import SUBPOPULATIONS_PER_CLASS
from memorization.estimator import auroc
from tests.conftest import build_dataset as build

SHAPES = {"seq-longtail": (1, 8, 8), "seq-longtail32": (3, 32, 32)}


@pytest.fixture(scope="module")
def longtail():
    return {name: build(name, "unused") for name in SHAPES}


def original_labels(dataset, split) -> np.ndarray:
    return dataset.class_order[split.labels.numpy()]


@pytest.mark.parametrize("name", SHAPES)
def test_shapes_dtypes_and_defaults(longtail, name):
    dataset = longtail[name]
    assert type(dataset).EMBEDDED and dataset.N_CLASSES == 10 and dataset.n_tasks == 5
    assert dataset.SETTING == "class-il" and dataset.DEFAULT_BATCH_SIZE == 32 and dataset.DEFAULT_N_EPOCHS == 10
    assert dataset.DEFAULT_BACKBONE == {"seq-longtail": "mlp", "seq-longtail32": "cnn"}[name]
    assert dataset.train.images.shape == (1200, *SHAPES[name]) and dataset.test.images.shape == (360, *SHAPES[name])
    assert dataset.train.images.dtype == torch.uint8 and dataset.train.labels.dtype == torch.int64
    assert np.bincount(dataset.train.labels.numpy()).tolist() == [120] * 10
    assert np.bincount(dataset.test.labels.numpy()).tolist() == [36] * 10
    assert [len(dataset.train_split(t)) for t in range(5)] == [240] * 5
    # The normalisation constants are the training pixels' statistics.
    pixels = dataset.train.images.float() / 255
    assert pixels.mean().item() == pytest.approx(dataset.MEAN[0], abs=0.003)
    assert pixels.std().item() == pytest.approx(dataset.STD[0], abs=0.003)
    assert "generated" in type(dataset).source("unused")


def test_every_class_has_4_frequent_4_rare_and_8_singleton_subpopulations(longtail):
    dataset = longtail["seq-longtail"]
    answer = dataset.known_answer()
    sub, size, single = answer["subpopulation"], answer["subpopulation_size"], answer["singleton"]
    assert sub.dtype == size.dtype == answer["test_subpopulation"].dtype == np.int64 and single.dtype == bool
    assert len(sub) == len(size) == len(single) == 1200 and len(answer["test_subpopulation"]) == 360
    labels = original_labels(dataset, dataset.train)
    for c in range(10):
        counts = np.bincount(sub[labels == c], minlength=160)
        assert sorted(counts[counts > 0].tolist()) == [1] * 8 + [4] * 4 + [24] * 4
        assert single[labels == c].sum() == 8
        assert (size[labels == c] == 4).sum() == 16 and (size[labels == c] == 24).sum() == 96
    assert single.sum() == 80 and (size == 4).sum() == 160 and (size == 24).sum() == 960
    assert np.array_equal(single, size == 1)
    assert np.array_equal(size, np.bincount(sub)[sub])  # the size is the subpopulation's training count


def test_every_subpopulation_lies_in_one_class_and_the_test_set_covers_each(longtail):
    dataset = longtail["seq-longtail"]
    answer = dataset.known_answer()
    sub, test_sub = answer["subpopulation"], answer["test_subpopulation"]
    assert np.array_equal(sub // SUBPOPULATIONS_PER_CLASS, original_labels(dataset, dataset.train))
    assert np.array_equal(test_sub // SUBPOPULATIONS_PER_CLASS, original_labels(dataset, dataset.test))
    assert set(test_sub.tolist()) == set(range(160))  # every singleton's subpopulation included
    test_counts = np.bincount(test_sub, minlength=160)
    for train_size, test_size in ((24, 6), (4, 1), (1, 1)):
        assert set(test_counts[np.unique(sub[answer["subpopulation_size"] == train_size])].tolist()) == {test_size}
    # The rows are shuffled: the score files' order is not class by class.
    assert not np.array_equal(np.sort(sub), sub)


@pytest.mark.parametrize("name", SHAPES)
def test_the_data_are_the_same_bytes_whatever_the_seed(longtail, name):
    reference = longtail[name]
    other = build(name, "unused", seed=7)
    for a, b in ((reference.train, other.train), (reference.test, other.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    for key, value in reference.known_answer().items():
        assert np.array_equal(value, other.known_answer()[key])
    # Both sizes hold the same subpopulations in the same rows.
    assert torch.equal(reference.train.labels, longtail["seq-longtail"].train.labels)
    assert torch.equal(reference.test.labels, longtail["seq-longtail"].test.labels)


def test_a_class_order_renames_labels_and_leaves_the_rows_where_they_are(longtail):
    order = [3, 7, 0, 9, 1, 5, 2, 8, 4, 6]
    dataset = build("seq-longtail", "unused", class_order=",".join(map(str, order)))
    assert torch.equal(dataset.train.images, longtail["seq-longtail"].train.images)
    sub = dataset.known_answer()["subpopulation"]
    assert np.array_equal(np.array(order)[dataset.train.labels.numpy()], sub // SUBPOPULATIONS_PER_CLASS)


def test_label_noise_relabels_within_the_task_and_leaves_the_known_answer(longtail):
    dataset = build("seq-longtail", "unused", label_noise=0.1, seed=3)
    clean = longtail["seq-longtail"]
    assert dataset.noisy_mask.sum() == 120
    assert np.array_equal(dataset.train.labels.numpy() != clean.train.labels.numpy(), dataset.noisy_mask)
    assert np.array_equal(dataset.train.labels.numpy() // 2, clean.train.labels.numpy() // 2)
    assert np.array_equal(dataset.known_answer()["singleton"], clean.known_answer()["singleton"])


@pytest.mark.parametrize("name", SHAPES)
def test_a_singleton_is_predicted_only_by_itself(longtail, name):
    """The nearest training image of every test image is of its own subpopulation; without the singletons in the
    training set, their subpopulations' test images are classified at about chance (10%) by nearest neighbour."""
    dataset = longtail[name]
    answer = dataset.known_answer()
    train = dataset.train.images.flatten(1).float()
    test = dataset.test.images.flatten(1).float()
    distances = torch.cdist(test, train)
    nearest = distances.argmin(1).numpy()
    assert np.array_equal(answer["subpopulation"][nearest], answer["test_subpopulation"])
    distances[:, torch.from_numpy(answer["singleton"])] = float("inf")
    without = distances.argmin(1).numpy()
    labels, test_labels = dataset.train.labels.numpy(), dataset.test.labels.numpy()
    of_singleton = np.isin(answer["test_subpopulation"], answer["subpopulation"][answer["singleton"]])
    assert of_singleton.sum() == 80
    assert (labels[without] == test_labels)[of_singleton].mean() < 0.3  # measured 0.15 (8×8), 0.16 (32×32)
    assert (labels[without] == test_labels)[~of_singleton].all()


def test_the_memorization_workflow_finds_the_singletons(tmp_path, tracking_uri):
    """16 MLPs on halves of seq-longtail, then their memorization scores: singletons score high, frequent
    subpopulations near 0, rare ones in between. Measured (seeds 0-3): AUROC 0.995-0.997, mean memorization of
    singletons 0.81-0.82, of rare examples 0.11-0.15, of frequent ones 0.001."""
    store, scores_file = tmp_path / "store", tmp_path / "scores.npy"
    assert train_splits.main(["--dataset", "seq-longtail", "--backbone", "mlp", "--mlp_hidden", "64",
                              "--n_models", "16", "--ensemble", "16", "--subset_ratio", "0.5", "--n_epochs", "5",
                              "--lr", "0.1", "--batch_size", "32", "--seed", "0", "--device", "cpu",
                              "--out", str(store), "--tracking_uri", tracking_uri, "--non_verbose", "1"]) == 0
    assert eval_splits.main(["--run_dir", str(store), "--out", str(scores_file), "--tracking_uri", tracking_uri]) == 0
    scores = np.load(scores_file, allow_pickle=False)
    answer = build("seq-longtail", "unused").known_answer()
    size = answer["subpopulation_size"]
    assert scores.shape == (1200,) and np.isfinite(scores).all()
    assert auroc(scores, answer["singleton"]) > 0.95
    singleton, rare, frequent = (scores[size == n].mean() for n in (1, 4, 24))
    assert singleton > 0.6 and frequent < 0.05 and singleton - frequent > 0.5
    assert frequent < rare < singleton
