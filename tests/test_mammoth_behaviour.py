"""Flags that give Mammoth's behaviour where it departs from the papers, each checked against what it
should compute (the defaults follow the papers): --bic_lambda, --gdumb_sampler, --agem_memory,
--class_mean_flip. tests/test_mammoth_runs.py checks agem's and icarl's against Mammoth's own runs."""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from buffer_policies import BUFFER_POLICIES, Buffer
from models.bic import bias_correct
from tests.conftest import build_model, train_steps
from tests.test_methods_icarl_bic_xder import stream


@pytest.mark.parametrize("choice, lam", [("paper", 4 / 6), ("mammoth", 1 / 3)])
def test_bic_distillation_weight_is_the_old_share_or_mammoths_one_over_t_plus_one(choice, lam):
    model, dataset = build_model("--buffer_size", "20", "--temp", "2", "--bic_lambda", choice, model="bic")
    stream(model, dataset, 0)
    stream(model, dataset, 1)
    model.lifecycle.begin_task(2)  # task 2 counted from 0: 4 old classes of 6 seen
    split = dataset.train_split(2)
    x, labels = dataset.test_transform(split.images[:16]), split.labels[:16]
    loss = model.observe(x, labels, split.images[:16], split.indices[:16], 2)
    with torch.no_grad():
        old = bias_correct(model.old_net(x), model.old_bias, range(2, 4))[:, :4]
        new = model.net(x)
        distill = -(F.softmax(old / 2, 1) * F.log_softmax(new[:, :4] / 2, 1)).sum(1).mean()
        expected = (1 - lam) * F.cross_entropy(new[:, :6], labels) + lam * 4 * distill
    assert torch.allclose(loss, expected)


def test_gdumb_reservoir_sampler_keeps_what_a_plain_reservoir_buffer_keeps():
    model, dataset = build_model("--buffer_size", "30", "--n_epochs", "1", "--gdumb_sampler", "reservoir",
                                 model="gdumb")
    args = argparse.Namespace(**vars(model.args))
    plain = Buffer(30, "cpu", BUFFER_POLICIES.get("reservoir")(args))
    split = dataset.train_split(0)
    torch.manual_seed(5)
    for start in range(0, 120, 20):  # 120 examples into 30 slots: the reservoir draws from the 31st on
        rows = torch.arange(start, start + 20)
        model.observe(None, split.labels[rows], split.images[rows], split.indices[rows], 0)
    torch.manual_seed(5)
    for start in range(0, 120, 20):
        rows = torch.arange(start, start + 20)
        plain.add_data(split.images[rows], split.labels[rows], indices=split.indices[rows])
    assert torch.equal(model.buffer.get_all()["indices"], plain.get_all()["indices"])
    assert len(model.buffer) == 30 and model.buffer.get_all()["indices"].max() >= 30  # replaced, not just filled


def test_gdumb_default_sampler_balances_the_classes():
    model, dataset = build_model("--buffer_size", "30", "--n_epochs", "1", model="gdumb")
    split = dataset.train_split(0)
    for start in range(0, 200, 20):
        rows = torch.arange(start, start + 20)
        model.observe(None, split.labels[rows], split.images[rows], split.indices[rows], 0)
    assert torch.bincount(model.buffer.get_all()["labels"]).tolist() == [15, 15]
    assert model.task_record(0)["metrics"] == {"buffer_count_class_0": 15, "buffer_count_class_1": 15}


@pytest.mark.parametrize("memory, kept", [("share", 40 // 5), ("batch", 6)])
def test_agem_keeps_a_share_of_the_buffer_or_one_stream_batch_per_task(memory, kept):
    model, dataset = build_model("--buffer_size", "40", "--batch_size", "6", "--agem_memory", memory, model="agem")
    for task in range(2):
        model.lifecycle.begin_task(task)
        train_steps(model, dataset, 2, task=task, batch_size=6)
        model.lifecycle.end_task(task)
        stored = model.buffer.get_all()
        assert torch.bincount(stored["task_labels"]).tolist() == [kept] * (task + 1)
        mine = stored["indices"][stored["task_labels"] == task]
        assert set(mine.tolist()) <= set(dataset.train_split(task).indices.tolist())


@pytest.mark.parametrize("flip", ["augmentation", "always"])
def test_icarl_class_means_average_flipped_exemplars_only_where_asked(flip):
    model, dataset = build_model("--buffer_size", "20", "--optim_wd", "0", "--class_mean_flip", flip, model="icarl")
    assert not dataset.FLIP  # the digits: their augmentation does not flip
    stream(model, dataset, 0)
    stored = model.buffer.get_all()
    features = model.normalized_features(stored["examples"])
    if flip == "always":
        features = (features + model.normalized_features(stored["examples"].flip(3))) / 2
    means = model.compute_class_means()
    for c in (0, 1):
        expected = F.normalize(features[stored["labels"] == c].mean(0), dim=0)
        assert torch.allclose(means[c], expected, atol=1e-6)
    flipped = model.normalized_features(stored["examples"].flip(3))
    assert not torch.allclose(flipped, model.normalized_features(stored["examples"]))  # the flag matters here
