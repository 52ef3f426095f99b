"""RPC: the fixed simplex classifier (unit-norm, equiangular vertices), the loss through it, the class-balanced
buffer written at task ends, and a short run against numbers computed by Mammoth's own RPC.

The MAMMOTH_* numbers were printed by `benchmarks/mammoth_parity_lucir_rpc.py` run with Mammoth's
interpreter on its work tree at commit e75a491 (torch 2.14, CPU, one thread): Mammoth's `models/rpc.py` on
its MNISTMLP, from the integer-formula weights of benchmarks/mammoth_parity_lockstep.py, on 60
integer-formula images, two tasks of two steps of 6, a buffer of 11 replayed whole (so the replay draw
decides only the order), torch seeded with 7 before each `end_task` (whose two torch.randperm draws our
rpc makes in the same order). Mammoth trains on the raw outputs, which is `--loss_on_polytope 0` here, and
its second `end_task` ran with the task counter one ahead (the quota over the seen classes, as the
formula was first written; models/rpc.py says why).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backbones import BACKBONES
from benchmarks.mammoth_parity_lockstep import scenario_weights
from benchmarks.mammoth_parity_lucir_rpc import EVAL_ROWS, N_TRAIN, SCENARIOS, scenario_images
from continual.args import parse_args
from datasets import DATASETS
from models import MODELS
from models.rpc import dsimplex
from tests.conftest import build_model, train_steps
from tests.test_dataset_files import MNIST_NAMES, write_idx

MAMMOTH_LOSSES = [2.3195254802703857, 1.4365843534469604, 2.5962328910827637, 1.8118360042572021]
MAMMOTH_BUFFER = [  # after each task: labels, and the sum of each stored image's pixels (in [0, 1])
    ([0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1],
     [387.89020407246426, 391.78039952740073, 388.14118435420096, 394.35294874571264, 383.0588310617022,
      401.63138032285497, 395.2313805297017, 399.30981191946194, 392.47059627762064, 392.6588315474801,
      395.98432161379606]),
    ([0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3],
     [387.89020407246426, 391.78039952740073, 394.35294874571264, 383.0588310617022, 402.5725569226779,
      380.36079189553857, 405.8353021624498, 387.9529490172863, 389.70981173962355, 383.18432142259553,
      400.8784391009249]),
]
MAMMOTH_WEIGHTS = {  # [sum, sum of squares, first entry] at the end
    "layers.0.weight": [-26.31874195761759, 177.9895557934645, -0.08218320459127426],
    "layers.0.bias": [-0.06627833269885741, 0.001906469652122173, -0.0016461738850921392],
    "layers.1.weight": [-2.6818513734083353, 100.00625599627988, -0.15555736422538757],
    "layers.1.bias": [-0.019807317294180393, 0.011485326616198709, -0.016092419624328613],
    "head.weight": [0.19151103367039468, 18.348046144552104, -0.1735822707414627],
    "head.bias": [4.656612873077393e-10, 0.00975453547487375, 0.06379739195108414],
}
MAMMOTH_EVAL_LOGITS = [-4.76837158203125e-07, 194.27016213938685, 2.2082409858703613]


def checksums(tensor: torch.Tensor) -> list[float]:
    return [tensor.double().sum().item(), tensor.double().square().sum().item(), tensor.flatten()[0].item()]


@pytest.mark.parametrize("k", [2, 3, 10, 100])
def test_simplex_vertices_are_unit_norm_equiangular_and_centred(k):
    vertices = torch.from_numpy(dsimplex(k))
    assert vertices.shape == (k - 1, k)
    gram = vertices.t() @ vertices
    assert torch.allclose(gram.diagonal(), torch.ones(k, dtype=torch.float64), atol=1e-12)
    off = gram[~torch.eye(k, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / (k - 1)), atol=1e-12)  # cos = -1/(K-1) for every pair
    assert torch.allclose(vertices.sum(1), torch.zeros(k - 1, dtype=torch.float64), atol=1e-12)


def test_simplex_by_hand():
    # K = 2: one dimension, a = 1 - sqrt(2); the points 1 and a centred at (1 + a) / 2 are ±(1 - a) / 2,
    # which scale to ±1. K = 3: an equilateral triangle, 120° apart.
    assert dsimplex(2).shape == (1, 2) and dsimplex(2)[0].tolist() == pytest.approx([1.0, -1.0])
    v = dsimplex(3)
    angles = [math.degrees(math.acos(v[:, i] @ v[:, j])) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert angles == pytest.approx([120.0] * 3)


def test_logits_are_the_first_outputs_through_the_fixed_vertices_and_the_loss_goes_through_them():
    model, dataset = build_model("--buffer_size", "20", model="rpc")
    head = model.net.head
    split = dataset.train_split(0)
    inputs, labels = dataset.test_transform(split.images[:8]), split.labels[:8]
    raw = head.raw(model.net.features(inputs))
    assert raw.shape == (8, 10)
    logits = raw[:, :9] @ torch.from_numpy(dsimplex(10)).float()
    assert torch.allclose(model.net(inputs), logits, atol=1e-6)
    loss = model.observe(inputs, labels, split.images[:8], split.indices[:8], 0)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(head.weight.grad[9]) == 0  # the last output is never read
    assert torch.count_nonzero(head.weight.grad[:9]) > 0
    assert not any(b.requires_grad for b in head.buffers())  # the vertices are fixed
    model.net.zero_grad()
    raw_model, _ = build_model("--buffer_size", "20", "--loss_on_polytope", "0", model="rpc")
    raw_loss = raw_model.observe(inputs, labels, split.images[:8], split.indices[:8], 0)
    expected = F.cross_entropy(raw_model.net.head.raw(raw_model.net.features(inputs)), labels)
    assert raw_loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_buffer_is_written_at_task_ends_balanced_over_the_seen_classes():
    model, dataset = build_model("--buffer_size", "21", model="rpc")
    model.lifecycle.begin_task(0)
    train_steps(model, dataset, 3, task=0, batch_size=16)
    assert model.buffer.is_empty()  # nothing is stored during a task
    model.lifecycle.end_task(0)
    counts = np.bincount(model.buffer.get_all()["labels"].numpy(), minlength=10)
    assert sorted(counts[:2].tolist()) == [10, 11] and counts.sum() == 21
    first = {c: model.buffer.get_all()["indices"][model.buffer.get_all()["labels"] == c][:5].clone() for c in (0, 1)}
    model.lifecycle.begin_task(1)
    train_steps(model, dataset, 3, task=1, batch_size=16)
    model.lifecycle.end_task(1)
    stored = model.buffer.get_all()
    # 21 // 4 = 5 for each old class (their first five), the 11 free slots 6 + 5 over the new classes.
    assert stored["labels"][:10].tolist() == [0] * 5 + [1] * 5
    assert torch.equal(stored["indices"][:5], first[0]) and torch.equal(stored["indices"][5:10], first[1])
    assert sorted(np.bincount(stored["labels"][10:].numpy(), minlength=4)[2:].tolist()) == [5, 6]
    assert torch.equal(stored["examples"], dataset.train.images[stored["indices"]])
    assert len(model.buffer) == 21


@pytest.fixture
def rpc_on_seq_mnist(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    images, labels = scenario_images(N_TRAIN), np.arange(N_TRAIN) % 10
    for name, array in zip(MNIST_NAMES, (images, labels, images, labels)):
        write_idx(folder / name, array)
    hyper = SCENARIOS["rpc"]
    args = parse_args(["--model", "rpc", "--dataset", "seq-mnist", "--data_path", str(tmp_path), "--lr",
                       str(hyper["lr"]), "--batch_size", str(hyper["batch_size"]), "--buffer_size",
                       str(hyper["buffer_size"]), "--minibatch_size", str(hyper["minibatch_size"]),
                       "--loss_on_polytope", "0", "--seed", "0", "--device", "cpu"])
    torch.manual_seed(0)
    dataset = DATASETS.get("seq-mnist")(args)
    model = MODELS.get("rpc")(BACKBONES.get("mlp")(args, dataset.SHAPE, dataset.N_CLASSES), dataset, args)
    with torch.no_grad():
        for name, value in scenario_weights().items():
            model.net.get_parameter(name).copy_(value)
    return model, dataset


def test_a_short_run_equals_mammoths_rpc(rpc_on_seq_mnist):
    model, dataset = rpc_on_seq_mnist
    hyper = SCENARIOS["rpc"]
    losses, current, buffers = [], None, []

    def end_task(task):
        torch.manual_seed(hyper["end_task_seed"])
        model.lifecycle.end_task(task)
        buffers.append({k: v.clone() for k, v in model.buffer.get_all().items()})

    for task, rows, _ in hyper["steps"]:
        if task != current:
            if current is not None:
                end_task(current)
            model.lifecycle.begin_task(task)
            current = task
        rows = torch.tensor(rows)
        raw = dataset.train.images[rows]
        loss = model.lifecycle.observe(dataset.train_transform(raw), dataset.train.labels[rows], raw, rows, task)
        model.lifecycle.step(loss)
        losses.append(loss.item())
    end_task(current)
    assert losses == pytest.approx(MAMMOTH_LOSSES, rel=1e-5)
    for stored, (labels, sums) in zip(buffers, MAMMOTH_BUFFER, strict=True):
        assert stored["labels"].tolist() == labels
        assert (stored["examples"].flatten(1).double().sum(1) / 255).tolist() == pytest.approx(sums, rel=1e-7)
    for name, expected in MAMMOTH_WEIGHTS.items():
        assert checksums(model.net.get_parameter(name).detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6), name
    model.eval()
    with torch.no_grad():
        logits = model(dataset.test_transform(dataset.train.images[torch.tensor(EVAL_ROWS)]))
    assert checksums(logits) == pytest.approx(MAMMOTH_EVAL_LOGITS, rel=1e-5, abs=1e-5)
