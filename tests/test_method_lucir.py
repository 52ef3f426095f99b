"""LUCIR: each loss term against a hand computation, the frozen rows of other tasks, imprinting, herded
exemplars, and a short run against numbers computed by Mammoth's own LUCIR.

The MAMMOTH_* numbers were printed by `benchmarks/mammoth_parity_lucir_rpc.py` run with Mammoth's
interpreter on its work tree at commit e75a491 (torch 2.14, CPU, one thread): Mammoth's `models/lucir.py`
on its MNISTMLP, from the integer-formula weights of benchmarks/mammoth_parity_lockstep.py, on 60
integer-formula images, two tasks of two steps each (the second task's batches append fixed buffer slots),
buffer 10 and batch 10 (each finetuning epoch is one batch of the whole buffer), 20 finetuning epochs.
Mammoth's distillation weight was set to the paper's lamda_base · sqrt(old / new classes) after each task,
the one deliberate difference (models/lucir.py says why); no random draw decides anything on either side.
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
from models._exemplars import herding
from models.lucir import margin_ranking_loss
from tests.conftest import build_model, train_steps
from tests.test_dataset_files import MNIST_NAMES, write_idx
from utils.errors import ConfigError

MAMMOTH_LOSSES = [2.3073294162750244, 2.176515817642212, 3.0477049350738525, 6.955596923828125]
MAMMOTH_FIT_LOSSES = {0: 2.1015732288360596, 9: 2.085817337036133, 10: 2.0840303897857666, 19: 2.082414150238037,
                      20: 2.7825944423675537, 39: 2.766205310821533}  # finetuning batch: loss
MAMMOTH_BUFFER = [  # after each task: labels, and the sum of each stored image's pixels (in [0, 1])
    ([0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
     [388.14118435420096, 399.30981191946194, 402.0705958730541, 392.6588315474801, 391.78039952740073,
      395.98432161379606, 401.63138032285497, 383.0588310617022, 392.47059627762064, 394.35294874571264]),
    ([0, 0, 1, 1, 2, 2, 3, 3],
     [388.14118435420096, 399.30981191946194, 395.98432161379606, 401.63138032285497, 395.2941254870966,
      380.36079189553857, 389.70981173962355, 390.58824271475896]),
]
MAMMOTH_IMPRINTED = [17.717023600969696, 3.539835716835622, 0.0032061333768069744]  # rows of task 1
MAMMOTH_WEIGHTS = {  # [sum, sum of squares, first entry] at the end
    "layers.0.weight": [9.841959365959326, 178.0465209571468, -0.08265621960163116],
    "layers.0.bias": [0.025917503448908974, 0.001649018720701455, -0.00431014271453023],
    "layers.1.weight": [-0.6441123568870353, 100.18216583914801, -0.15406011044979095],
    "layers.1.bias": [0.0009578997560311109, 0.0065363157032907685, -0.01346580870449543],
    "head.sigma": [1.0916128158569336, 1.1916185397431036, 1.0916128158569336],
    "rows 0": [1.5799038271652535, 3.5398364144233874, -0.17386870086193085],
    "rows 1": [17.277481232789796, 3.5410136235510246, -0.0026780753396451473],
    "rows 2": [-0.42903078615199775, 3.748214017199021, 0.21229666471481323],
    "rows 3": [1.9116041634697467, 3.6773447613465224, 0.17259322106838226],
    "rows 4": [0.5135757328243926, 3.5625020085364034, 0.1328897625207901],
}
MAMMOTH_EVAL_LOGITS = [3.0817021938128164, 1.4904726356036004, 0.092636339366436]


def checksums(tensor: torch.Tensor) -> list[float]:
    return [tensor.double().sum().item(), tensor.double().square().sum().item(), tensor.flatten()[0].item()]


def stream(model, dataset, task: int, steps: int = 3) -> None:
    model.lifecycle.begin_task(task)
    train_steps(model, dataset, steps, task=task, batch_size=16)
    model.lifecycle.end_task(task)


# ------------------------------------------------------------------------------------------ loss terms

def test_margin_ranking_by_hand():
    cosine = torch.tensor([[0.9, 0.1, 0.5, 0.7],
                           [0.2, 0.3, 0.6, 0.1],
                           [0.4, 0.2, 0.8, 0.3]])
    labels = torch.tensor([0, 1, 2])
    # Old examples (label < 2): rows 0 and 1, hard negatives the top 2 of columns 2, 3.
    # Row 0: own 0.9, negatives 0.7, 0.5 → relu(0.5 - 0.9 + 0.7) = 0.3, relu(0.5 - 0.9 + 0.5) = 0.1.
    # Row 1: own 0.3, negatives 0.6, 0.1 → 0.8, 0.3. Mean of the four: 0.375. Row 2 (new class) does not count.
    assert margin_ranking_loss(cosine, labels, 2, 2, 0.5).item() == pytest.approx(0.375)
    assert margin_ranking_loss(cosine, labels, 2, 1, 0.5).item() == pytest.approx((0.3 + 0.8) / 2)
    assert margin_ranking_loss(cosine, torch.tensor([2, 3, 2]), 2, 2, 0.5).item() == 0.0


def test_each_loss_term_on_a_tiny_batch():
    model, dataset = build_model("--buffer_size", "20", model="lucir")
    stream(model, dataset, 0)
    model.lifecycle.begin_task(1)
    split = dataset.train_split(1)
    stored = model.buffer.get_all()
    images = torch.cat([split.images[:3], stored["examples"][:3]])
    labels = torch.cat([split.labels[:3], stored["labels"][:3]])
    inputs = dataset.test_transform(images)
    with torch.no_grad():  # move the current network away from the frozen one, so distillation is not 0
        model.net.layers[0].weight.mul_(1.1)
    features = model.net.features(inputs)
    old = model.old_net.features(inputs)
    weight, sigma = model.net.head.weight, model.net.head.sigma
    cosine = (features / features.norm(dim=1, keepdim=True)) @ (weight / weight.norm(dim=1, keepdim=True)).t()
    cross_entropy = -torch.log_softmax(sigma * cosine, dim=1)[torch.arange(6), labels].mean()
    distill = (1 - (features * old).sum(1) / (features.norm(dim=1) * old.norm(dim=1))).mean()
    weight_1 = 5.0 * math.sqrt(2 / 2)  # lamda_base · sqrt(old classes / new classes) at task 1
    hinge = []
    for row in range(3, 6):  # the exemplars: 2 hardest negatives among classes 2..9
        negatives = cosine[row, 2:].topk(2).values
        hinge += [F.relu(0.5 - cosine[row, labels[row]] + n) for n in negatives]
    expected = cross_entropy + weight_1 * distill + torch.stack(hinge).mean()
    assert distill.item() > 1e-4 and torch.stack(hinge).mean().item() > 0
    assert model.lucir_loss(inputs, labels, 1).item() == pytest.approx(expected.item(), rel=1e-5)
    assert model.lucir_loss(inputs, labels, 0).item() == pytest.approx(cross_entropy.item(), rel=1e-5)
    assert model.distillation_weight(2) == pytest.approx(5.0 * math.sqrt(2))
    assert model.distillation_weight(4) == pytest.approx(5.0 * 2)


def test_only_the_current_tasks_rows_and_the_scale_move():
    model, dataset = build_model("--buffer_size", "20", "--optim_wd", "0.01", "--optim_mom", "0.9",
                                 "--fitting_epochs", "2", model="lucir")
    head = model.net.head
    before = head.weight.detach().clone()
    model.lifecycle.begin_task(0)
    train_steps(model, dataset, 3, task=0, batch_size=16)
    moved = (head.weight.detach() != before).any(1)
    assert moved[:2].all() and not moved[2:].any()  # weight decay and momentum too leave other rows alone
    assert head.sigma.item() != 1.0
    model.lifecycle.end_task(0)  # the finetuning moves only the same rows
    assert torch.equal(head.weight.detach()[2:], before[2:])
    after_task_0 = head.weight.detach().clone()
    model.lifecycle.begin_task(1)
    train_steps(model, dataset, 3, task=1, batch_size=16)
    moved = (head.weight.detach() != after_task_0).any(1)
    assert moved[2:4].all() and not moved[:2].any() and not moved[4:].any()


def test_new_rows_are_imprinted_from_mean_normalised_features():
    model, dataset = build_model("--buffer_size", "20", model="lucir")
    stream(model, dataset, 0)
    old_norm = model.net.head.weight[:2].detach().norm(dim=1).mean()
    model.lifecycle.begin_task(1)
    split = dataset.train_split(1)
    model.net.eval()
    with torch.no_grad():
        for c in (2, 3):
            features = model.net.features(dataset.test_transform(split.images[split.labels == c]))
            mean = F.normalize(features, dim=1).mean(0)
            expected = mean / mean.norm() * old_norm
            assert torch.allclose(model.net.head.weight[c], expected, atol=1e-6)
            assert model.net.head.weight[c].norm().item() == pytest.approx(old_norm.item(), rel=1e-5)


def test_exemplars_are_herded_on_the_features_and_balanced():
    model, dataset = build_model("--buffer_size", "20", "--fitting_epochs", "0", model="lucir")
    model.lifecycle.begin_task(0)
    train_steps(model, dataset, 3, task=0, batch_size=16)
    split = dataset.train_split(0)
    expected = []
    for c in (0, 1):  # herding on the raw penultimate features, before the task's exemplars are stored
        rows = torch.nonzero(split.labels == c).flatten()
        expected.append(split.indices[rows[herding(model.features(split.images[rows]), 10)]])
    model.lifecycle.end_task(0)
    stored = model.buffer.get_all()
    assert stored["labels"].tolist() == [0] * 10 + [1] * 10
    assert torch.equal(stored["indices"], torch.cat(expected))
    stream(model, dataset, 1)
    assert model.buffer.get_all()["labels"].tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    assert torch.equal(model.buffer.get_all()["indices"][:5], expected[0][:5])
    assert len(model.training_data(2)) == len(dataset.train_split(2)) + 20


@pytest.mark.parametrize("flags,words", [(["--k_mr", "3"], "--k_mr"), (["--optimizer", "adam"], "SGD"),
                                         (["--buffer_size", "5"], "--buffer_size")])
def test_bad_flags_are_refused_with_the_fix(flags, words):
    with pytest.raises(ConfigError, match=words):
        build_model("--buffer_size", "20", *flags, model="lucir")


# ------------------------------------------------------------------------------------------ Mammoth

@pytest.fixture
def lucir_on_seq_mnist(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    images, labels = scenario_images(N_TRAIN), np.arange(N_TRAIN) % 10
    for name, array in zip(MNIST_NAMES, (images, labels, images, labels)):
        write_idx(folder / name, array)
    hyper = SCENARIOS["lucir"]
    args = parse_args(["--model", "lucir", "--dataset", "seq-mnist", "--data_path", str(tmp_path), "--lr",
                       str(hyper["lr"]), "--batch_size", str(hyper["batch_size"]), "--buffer_size",
                       str(hyper["buffer_size"]), "--seed", "0", "--device", "cpu"])
    torch.manual_seed(0)
    dataset = DATASETS.get("seq-mnist")(args)
    model = MODELS.get("lucir")(BACKBONES.get("mlp")(args, dataset.SHAPE, dataset.N_CLASSES), dataset, args)
    with torch.no_grad():
        for name, value in scenario_weights().items():
            if name != "head.bias":  # the cosine classifier has no bias
                model.net.get_parameter(name).copy_(value)
    return model, dataset


def test_a_short_run_equals_mammoths_lucir(lucir_on_seq_mnist):
    model, dataset = lucir_on_seq_mnist
    fit_losses = []
    step = model.optimizer_step

    def recording_step(loss, optimizer=None, batch=None):
        if optimizer is not None:
            fit_losses.append(loss.item())
        step(loss, optimizer, batch)
    model.optimizer_step = recording_step
    losses, current, imprinted, buffers = [], None, None, []
    for task, rows, slots in SCENARIOS["lucir"]["steps"]:
        if task != current:
            if current is not None:
                model.lifecycle.end_task(current)
                buffers.append({k: v.clone() for k, v in model.buffer.get_all().items()})
            model.lifecycle.begin_task(task)
            if task == 1:
                imprinted = model.net.head.weight[2:4].detach().clone()
            current = task
        rows = torch.tensor(rows)
        raw, labels, indices = dataset.train.images[rows], dataset.train.labels[rows], rows
        if slots:
            stored = model.buffer.get_all()
            raw = torch.cat([raw, stored["examples"][slots]])
            labels = torch.cat([labels, stored["labels"][slots]])
            indices = torch.cat([indices, stored["indices"][slots]])
        loss = model.lifecycle.observe(dataset.train_transform(raw), labels, raw, indices, task)
        model.lifecycle.step(loss)
        losses.append(loss.item())
    model.lifecycle.end_task(current)
    buffers.append(model.buffer.get_all())
    assert losses == pytest.approx(MAMMOTH_LOSSES, rel=1e-5)
    assert checksums(imprinted) == pytest.approx(MAMMOTH_IMPRINTED, rel=1e-5, abs=1e-6)
    assert len(fit_losses) == 40
    assert {i: fit_losses[i] for i in MAMMOTH_FIT_LOSSES} == pytest.approx(MAMMOTH_FIT_LOSSES, rel=1e-5)
    for stored, (labels, sums) in zip(buffers, MAMMOTH_BUFFER, strict=True):
        assert stored["labels"].tolist() == labels
        assert (stored["examples"].flatten(1).double().sum(1) / 255).tolist() == pytest.approx(sums, rel=1e-7)  # Mammoth: float32 k/255
    weights = {name: model.net.get_parameter(name).detach() for name in
               ("layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias", "head.sigma")}
    weights.update({f"rows {t}": model.net.head.weight[2 * t:2 * t + 2].detach() for t in range(5)})
    for name, expected in MAMMOTH_WEIGHTS.items():
        assert checksums(weights[name]) == pytest.approx(expected, rel=1e-5, abs=1e-6), name
    model.eval()
    with torch.no_grad():
        logits = model(dataset.test_transform(dataset.train.images[torch.tensor(EVAL_ROWS)]))
    assert checksums(logits) == pytest.approx(MAMMOTH_EVAL_LOGITS, rel=1e-5, abs=1e-6)
