"""Parity with Mammoth, pinned without Mammoth: the mlp's initialisation on Mammoth's datasets, and DER++.

The MAMMOTH_* numbers were computed by Mammoth's own code (its work tree at commit e75a491, torch
2.14 on CPU), printed by `benchmarks/mammoth_parity.py reference`: the fixed scenario of
`benchmarks/mammoth_parity_lockstep.py` (integer-formula images and initial weights, two tasks of
batch 4, a buffer of 20 that never fills and is replayed whole, so no random draw matters) run
through Mammoth's DER++ (`models/derpp.py`, `utils/buffer.py`) on its MNISTMLP. `benchmarks/
mammoth_parity.py lockstep` compares the two codes step by step over whole runs, with the same
draws on both sides.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from backbones import BACKBONES
from benchmarks.mammoth_parity_lockstep import SCENARIO, scenario_batches, scenario_images, scenario_weights
from continual.args import parse_args
from datasets import DATASETS
from models import MODELS
from tests.test_dataset_files import MNIST_NAMES, write_idx

MAMMOTH_LOSSES = [2.4512665271759033, 2.514840841293335, 3.834665536880493, 4.826456069946289, 4.879204750061035]
MAMMOTH_WEIGHTS = {  # name: [sum, sum of squares, first entry], after the 5 steps
    "layers.0.weight": [-179.70156224538295, 178.64686496057698, -0.08398875594139099],
    "layers.0.bias": [-0.457127131150628, 0.004960244981999585, -0.0058281742967665195],
    "layers.1.weight": [-14.179244418744076, 99.51253401559453, -0.15607255697250366],
    "layers.1.bias": [-0.4005906989768846, 0.026154697410247327, -0.033732108771800995],
    "head.weight": [2.087654865850709, 20.524051849620772, -0.15107028186321259],
    "head.bias": [0.01885879784822464, 0.016494709957712142, -0.054332226514816284],
}
MAMMOTH_BUFFER_LOGITS = [-8.653765192255378, 579.9247474053886, 0.03973439335823059]  # the 20 stored rows
XAVIER_BOUNDS = {"layers.0": math.sqrt(6 / 884), "layers.1": math.sqrt(6 / 200), "head": math.sqrt(6 / 110)}


def args_for(*flags: str):
    return parse_args(["--model", "derpp", "--lr", "0.1", "--seed", "0", "--device", "cpu", "--buffer_size", "20",
                       "--alpha", "0.3", "--beta", "0.5", *flags])


def mlp(args, shape=(1, 28, 28)):
    torch.manual_seed(0)
    return BACKBONES.get("mlp")(args, shape, 10)


@pytest.mark.parametrize("dataset,init", [("seq-mnist", "xavier"), ("perm-mnist", "xavier"), ("rot-mnist", "xavier"),
                                          ("seq-digits", "torch"), ("random-label-mnist", "torch")])
def test_mlp_init_defaults_to_mammoths_on_mammoths_datasets(dataset, init):
    assert args_for("--dataset", dataset).mlp_init == init
    assert args_for("--dataset", dataset, "--mlp_init", "torch").mlp_init == "torch"


def test_seq_mnist_mlp_is_mammoths_mnistmlp_draw_for_draw():
    ours = mlp(args_for("--dataset", "seq-mnist"))
    # Mammoth's backbone/MNISTMLP.py: three nn.Linear built in order, then `net.apply(xavier)`
    # (backbone/__init__.py: weight.uniform_(-a, a), a = sqrt(3) * sqrt(2 / (fan_in + fan_out)); bias 0).
    torch.manual_seed(0)
    theirs = [nn.Linear(784, 100), nn.Linear(100, 100), nn.Linear(100, 10)]
    for layer in theirs:
        a = math.sqrt(3.0) * math.sqrt(2.0 / (layer.in_features + layer.out_features))
        layer.weight.data.uniform_(-a, a)
        layer.bias.data.fill_(0.0)
    for name, layer in zip(XAVIER_BOUNDS, theirs):
        assert torch.equal(ours.get_parameter(f"{name}.weight"), layer.weight)
        assert torch.equal(ours.get_parameter(f"{name}.bias"), layer.bias)


def test_xavier_bounds_zero_biases_and_resets_from_the_same_distribution():
    net = mlp(args_for("--dataset", "seq-mnist"))
    for _ in range(2):  # as built, then after a reset redrew every layer
        for name, bound in XAVIER_BOUNDS.items():
            weight, bias = net.get_parameter(f"{name}.weight"), net.get_parameter(f"{name}.bias")
            assert weight.abs().max() <= bound and weight.abs().max() > 0.95 * bound
            assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.08)
            assert torch.count_nonzero(bias) == 0
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(1.0)
        net.reinitialize_()


def test_torch_init_is_pytorchs_linear_default():
    net = mlp(args_for("--dataset", "seq-digits"), shape=(1, 8, 8))
    first = net.get_parameter("layers.0.weight")
    assert first.abs().max() <= 1 / 8 and first.abs().max() > 0.95 / 8  # U(±1/sqrt(64))
    assert torch.count_nonzero(net.get_parameter("layers.0.bias")) == 100


@pytest.fixture
def derpp_on_seq_mnist(tmp_path):
    """Our DER++ on seq-mnist (read from small idx files), with the scenario's hyperparameters and weights."""
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    images, labels = scenario_images(12), np.arange(12) % 10
    for name, array in zip(MNIST_NAMES, (images, labels, images, labels)):
        write_idx(folder / name, array)
    args = args_for("--dataset", "seq-mnist", "--data_path", str(tmp_path), "--batch_size", str(SCENARIO["batch_size"]),
                    "--minibatch_size", str(SCENARIO["minibatch_size"]))
    assert args.buffer_size == SCENARIO["buffer_size"] and args.mlp_init == "xavier"
    dataset = DATASETS.get("seq-mnist")(args)
    model = MODELS.get("derpp")(BACKBONES.get("mlp")(args, dataset.SHAPE, dataset.N_CLASSES), dataset, args)
    with torch.no_grad():
        for name, value in scenario_weights().items():
            model.net.get_parameter(name).copy_(value)
    return model, dataset


def checksums(tensor: torch.Tensor) -> list[float]:
    return [tensor.double().sum().item(), tensor.double().square().sum().item(), tensor.flatten()[0].item()]


def test_derpp_steps_equal_mammoths(derpp_on_seq_mnist):
    model, dataset = derpp_on_seq_mnist
    losses, current, start = [], None, 0
    for task, images, labels in scenario_batches():
        if task != current:
            if current is not None:
                model.lifecycle.end_task(current)
            model.lifecycle.begin_task(task)
            current = task
        raw = torch.from_numpy(images)[:, None]
        indices = torch.arange(start, start + len(raw))
        start += len(raw)
        loss = model.lifecycle.observe(dataset.train_transform(raw), torch.from_numpy(labels), raw, indices, task)
        model.lifecycle.step(loss)
        losses.append(loss.item())
    assert losses == pytest.approx(MAMMOTH_LOSSES, rel=1e-5)
    for name, expected in MAMMOTH_WEIGHTS.items():
        assert checksums(model.net.get_parameter(name).detach()) == pytest.approx(expected, rel=1e-5, abs=1e-5), name
    assert checksums(model.buffer.logits) == pytest.approx(MAMMOTH_BUFFER_LOGITS, rel=1e-5, abs=1e-5)


def test_derpp_replays_two_separate_draws_as_mammoth(derpp_on_seq_mnist):
    """Once the buffer holds more than a minibatch, each step draws two batches (Mammoth's `get_data`
    twice), and the loss is Mammoth's: CE(stream) + alpha MSE(logits of draw 1) + beta CE(draw 2)."""
    model, dataset = derpp_on_seq_mnist
    model.args.minibatch_size = 5
    draws, get_data = [], model.buffer.get_data
    model.buffer.get_data = lambda size, transform=None: draws.append(get_data(size, transform)) or draws[-1]
    batches = scenario_batches()
    for step, (task, images, labels) in enumerate(batches):
        raw, labels = torch.from_numpy(images)[:, None], torch.from_numpy(labels)
        inputs = dataset.train_transform(raw)
        draws.clear()
        before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
        loss = model.lifecycle.observe(inputs, labels, raw, torch.arange(4 * step, 4 * step + 4), task)
        model.lifecycle.step(loss)
        if step < 2:  # an empty buffer, then 4 stored examples (below the minibatch of 5, replayed whole)
            continue
        assert len(draws) == 2 and not torch.equal(draws[0]["indices"], draws[1]["indices"])
        net = BACKBONES.get("mlp")(model.args, dataset.SHAPE, dataset.N_CLASSES)
        net.load_state_dict(before)
        theirs = (nn.functional.cross_entropy(net(inputs), labels)
                  + 0.3 * nn.functional.mse_loss(net(draws[0]["examples"]), draws[0]["logits"])
                  + 0.5 * nn.functional.cross_entropy(net(draws[1]["examples"]), draws[1]["labels"]))
        theirs.backward()
        assert loss.item() == pytest.approx(theirs.item(), rel=1e-6)
        for name, p in net.named_parameters():
            assert torch.allclose(model.net.get_parameter(name), before[name] - 0.1 * p.grad, atol=1e-7), name
