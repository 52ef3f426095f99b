"""Progressive Neural Networks: a column per task, frozen earlier columns, lateral adapters, task-IL evaluation
through each task's column, and parity with Mammoth.

The MAMMOTH_* numbers were computed by Mammoth's own code (its work tree at commit e75a491, torch 2.14 on CPU),
printed by `benchmarks/mammoth_parity_pnn.py` run with Mammoth's interpreter: its backbone/MNISTMLP_PNN.py
trained as its models/pnn.py trains (SGD at lr 0.1 over the column, cross-entropy over all classes, a new
column and optimizer after the first task) on the fixed scenario of benchmarks/mammoth_parity_lockstep.py
(integer-formula images, 3 steps of task 0 and 2 of task 1, batch 4), the columns' weights set by formulas.
Stock Mammoth never takes its lateral branch; the second column's numbers are Mammoth's with the branch
switched on (`old_cols` set), which the script checks against ours to the last bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from types import SimpleNamespace

from backbones import BACKBONES
from backbones._pnn_mlp import ProgressiveMLP
from backbones.mlp import MLP
from benchmarks.mammoth_parity_lockstep import scenario_batches, scenario_images, scenario_weights
from benchmarks.mammoth_parity_pnn import column_two_weights, inputs
from continual.args import parse_args
from continual.evaluation import evaluate
from datasets import DATASETS
from models import MODELS
from tests.conftest import build_model, train_steps
from tests.test_dataset_files import MNIST_NAMES, write_idx
from tests.test_mammoth_parity import checksums
from utils.errors import ConfigError

MAMMOTH_FIRST_LOGITS = [1.197142501361668, 1.5594217940132884, 0.0397343635559082]
MAMMOTH_FIRST_LOSSES = [2.4512665271759033, 1.5849100351333618, 1.0349010229110718]
MAMMOTH_SECOND_LOGITS = [2.0653878224547952, 2.6093270998181906, 0.30617332458496094]
MAMMOTH_SECOND_LOSSES = [2.440462827682495, 1.8640207052230835]
MAMMOTH_SECOND_AFTER = {  # [sum, sum of squares, first entry] after the second column's 2 steps
    "columns.1.layers.0.weight": [21.217539442811017, 177.95240438678667, -0.05042951926589012],
    "columns.1.layers.1.bias": [-0.16596864722669125, 0.06075886597964229, 0.007770578842610121],
    "columns.1.head.weight": [-0.4888197825712268, 18.425045297962587, -0.09623432904481888],
    "adapters.1.0.project.weight": [0.14880597748370405, 100.14837635298898, -0.044340502470731735],
    "adapters.1.0.out.weight": [-0.01750582278600632, 100.15684849710209, -0.022454310208559036],
    "adapters.1.1.project.bias": [-0.06940000579925254, 0.05921170019423242, -0.005561886355280876],
    "adapters.1.1.out.weight": [-1.014072749967454, 18.095442810521696, 0.02049657143652439],
    "adapters.1.0.alpha": [4.998885258566588, 0.3273175704690878, 0.0479000024497509],
    "adapters.1.1.alpha": [4.990074249682948, 0.3322438577522629, 0.054063424468040466],
}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_column_per_task_and_earlier_columns_never_change():
    model, dataset = build_model(model="pnn")
    frozen = []  # (column, its adapters, their weights at the end of their task)
    for task in range(3):
        model.lifecycle.begin_task(task)
        assert len(model.net.columns) == len(model.net.adapters) == task + 1
        newest = [*model.net.columns[task].parameters(), *model.net.adapters[task].parameters()]
        assert {id(p) for g in model.opt.param_groups for p in g["params"]} == {id(p) for p in newest}
        assert all(p.requires_grad for p in newest)
        train_steps(model, dataset, 5, task=task)
        model.lifecycle.end_task(task)
        for column, adapters, weights in frozen:
            assert not any(p.requires_grad for p in [*column.parameters(), *adapters.parameters()])
            now = {**{f"c.{k}": v for k, v in column.state_dict().items()},
                   **{f"a.{k}": v for k, v in adapters.state_dict().items()}}
            assert all(torch.equal(now[k], v) for k, v in weights.items())
        weights = {**{f"c.{k}": v for k, v in snapshot(model.net.columns[task]).items()},
                   **{f"a.{k}": v for k, v in snapshot(model.net.adapters[task]).items()}}
        assert task == 0 or not torch.equal(weights["c.head.weight"], frozen[-1][2]["c.head.weight"])
        frozen.append((model.net.columns[task], model.net.adapters[task], weights))
    assert [len(a) for a in model.net.adapters] == [0, 2, 2]  # into the second hidden layer and the head


def test_lateral_adapters_match_a_hand_computation():
    """Three columns of a 3-2-2-2 mlp: column 3's second layer and head receive U ReLU(V (α ⊙ [h¹, h²]) + c)
    from both earlier columns' activations, column 2's own laterals included (the paper's network)."""
    args = SimpleNamespace(mlp_hidden="2,2", mlp_init="torch", mlp_norm="none", dataset="seq-digits")
    torch.manual_seed(0)
    net = ProgressiveMLP(MLP(args, (3,), 2))
    net.add_column(MLP(args, (3,), 2))
    net.add_column(MLP(args, (3,), 2))
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    p = {k: v.detach().numpy().astype(np.float64) for k, v in net.state_dict().items()}
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    lin = lambda v, name: v @ p[f"{name}.weight"].T + p.get(f"{name}.bias", 0.0)  # noqa: E731

    def adapter(k, i, earlier):
        return lin(relu(lin(earlier * p[f"adapters.{k}.{i}.alpha"], f"adapters.{k}.{i}.project")),
                   f"adapters.{k}.{i}.out")

    xs = x.numpy().astype(np.float64)
    h1 = [relu(lin(xs, f"columns.{k}.layers.0")) for k in range(3)]
    h2 = [relu(lin(h1[0], "columns.0.layers.1"))]
    h2.append(relu(lin(h1[1], "columns.1.layers.1") + adapter(1, 0, h1[0])))
    h2.append(relu(lin(h1[2], "columns.2.layers.1") + adapter(2, 0, np.concatenate([h1[0], h1[1]], 1))))
    logits = [lin(h2[0], "columns.0.head"),
              lin(h2[1], "columns.1.head") + adapter(1, 1, h2[0]),
              lin(h2[2], "columns.2.head") + adapter(2, 1, np.concatenate([h2[0], h2[1]], 1))]
    for k in range(3):
        np.testing.assert_allclose(net(x, k).detach().numpy(), logits[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net(x).detach().numpy(), logits[2], rtol=1e-5, atol=1e-6)  # the newest
    alone = net.columns[2](x).detach().numpy()  # the third column without its laterals
    assert np.abs(logits[2] - alone).max() > 1e-3


def test_task_il_evaluation_predicts_each_task_through_its_own_column(monkeypatch):
    model, dataset = build_model(model="pnn")
    for task in range(2):
        model.lifecycle.begin_task(task)
        train_steps(model, dataset, 10, task=task)
        model.lifecycle.end_task(task)
    asked = []
    net_forward = model.net.forward
    monkeypatch.setattr(model.net, "forward", lambda x, column=None: asked.append(column) or net_forward(x, column))
    accuracy = evaluate(model, dataset, last_task=1)
    assert set(asked) == {0, 1} and asked == sorted(asked)
    assert accuracy["class_il"].tolist() == [0.0, 0.0]  # as Mammoth reports a task-IL-only model
    for task in range(2):
        split, classes = dataset.test_split(task), dataset.task_classes(task)
        with torch.no_grad():
            column = model.net.columns[task](dataset.test_transform(split.images))  # the task's column alone
        expected = 100.0 * ((column[:, classes.start:classes.stop].argmax(1) + classes.start) == split.labels).float().mean()
        assert accuracy["task_il"][task] == pytest.approx(expected.item())
    masked = model(dataset.test_transform(dataset.test_split(1).images[:3]), 1)
    assert torch.isinf(masked[:, :2]).all() and torch.isinf(masked[:, 4:]).all() and torch.isfinite(masked[:, 2:4]).all()
    with pytest.raises(ConfigError, match="model\\(images, task\\)"):
        model(dataset.test_transform(split.images[:3]))


def test_two_columns_train_as_mammoths_pnn(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    images, labels = scenario_images(12), np.arange(12) % 10
    for name, array in zip(MNIST_NAMES, (images, labels, images, labels)):
        write_idx(folder / name, array)
    args = parse_args(["--model", "pnn", "--dataset", "seq-mnist", "--data_path", str(tmp_path), "--lr", "0.1",
                       "--seed", "0", "--device", "cpu", "--batch_size", "4"])
    dataset = DATASETS.get("seq-mnist")(args)
    model = MODELS.get("pnn")(BACKBONES.get("mlp")(args, dataset.SHAPE, dataset.N_CLASSES), dataset, args)
    batches = scenario_batches()
    probe = inputs(np.stack([b[1] for b in batches]).reshape(-1, 28, 28)[:8])
    weights = {0: {f"columns.0.{k}": v for k, v in scenario_weights().items()}, 1: column_two_weights()}
    losses, logits = {0: [], 1: []}, {}
    for task in (0, 1):
        model.lifecycle.begin_task(task)
        with torch.no_grad():
            for name, value in weights[task].items():
                model.net.get_parameter(name).copy_(value)
            logits[task] = model.net(probe, task)
        for _, raw, y in (b for b in batches if b[0] == task):
            raw = torch.from_numpy(raw)[:, None]
            loss = model.lifecycle.observe(dataset.train_transform(raw), torch.from_numpy(y), raw, torch.arange(4), task)
            model.lifecycle.step(loss)
            losses[task].append(loss.item())
        model.lifecycle.end_task(task)
    assert checksums(logits[0]) == pytest.approx(MAMMOTH_FIRST_LOGITS, rel=1e-5, abs=1e-6)
    assert checksums(logits[1]) == pytest.approx(MAMMOTH_SECOND_LOGITS, rel=1e-5, abs=1e-6)
    assert losses[0] == pytest.approx(MAMMOTH_FIRST_LOSSES, rel=1e-5)
    assert losses[1] == pytest.approx(MAMMOTH_SECOND_LOSSES, rel=1e-5)
    for name, expected in MAMMOTH_SECOND_AFTER.items():
        assert checksums(model.net.get_parameter(name).detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("flags, problem", [
    (["--dataset", "perm-mnist"], "domain-incremental"),
    (["--backbone", "cnn"], "mlp backbone only"),
    (["--mlp_norm", "layernorm"], "plain ReLU mlps"),
    (["--plasticity", "l2"], "--plasticity"),
    (["--covariates"], "--covariates"),
])
def test_settings_pnn_cannot_run_are_refused_in_one_sentence(flags, problem):
    with pytest.raises(ConfigError, match=problem) as refused:
        MODELS.get("pnn").check_args(parse_args(["--model", "pnn", "--lr", "0.1", "--dataset", "seq-digits", *flags]))
    assert "\n" not in str(refused.value)
