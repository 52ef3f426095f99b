"""HAL (models/hal.py): the step, φ and the anchors against computations by hand, and Mammoth's numbers.

The MAMMOTH_* numbers were computed by Mammoth's own code (its work tree at commit e75a491, torch 2.14 on
CPU, one thread) and printed by `/work/mammoth-venv/bin/python benchmarks/mammoth_parity_hal_fdr.py`: its
`models/hal.py` on its MNISTMLP, from the fixed weights of `benchmarks/mammoth_parity_lockstep.py`, on the
script's HAL scenario (seq-mnist, batch 6, one step of task 0, anchors of classes 0 and 1 learned from
starts drawn after `torch.manual_seed(0)`, two steps of task 1; a buffer of 30 replayed whole, which
neither Mammoth's ring nor our reservoir overwrites). MAMMOTH_UNALIASED is Mammoth with its spare network's
`set_params` given a copy of the parameter vector; MAMMOTH_AS_IS is Mammoth unchanged, whose fine-tuning
writes θ_m into θ through that aliasing (models/hal.py's docstring).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import models.hal as hal_module
from benchmarks.mammoth_parity_hal_fdr import HAL, run_ours, write_scenario_mnist
from models.hal import Hal
from tests.conftest import build_model, train_steps

MAMMOTH_UNALIASED = {
    "losses": [2.3849949836730957, 1.9744205288589, 1.7025359123945236],
    "weights": {  # name: [sum, sum of squares, first entry], after the 3 steps
        "layers.0.weight": [3.690492063506909, 177.8869435477422, -0.08205519616603851],
        "layers.0.bias": [0.010738091885286849, 0.0014765411108203451, -0.00042812954052351415],
        "layers.1.weight": [-1.3421331980885043, 100.21766752911171, -0.1538807600736618],
        "layers.1.bias": [-0.013980708201415837, 0.010835128769980655, -0.013002702966332436],
        "head.weight": [0.04347420923295431, 18.22597043411875, -0.16933807730674744],
        "head.bias": [-0.005908621475100517, 0.0067805807263506095, 0.04047749564051628],
    },
    "anchors": [[385.1819434995996, 258.74012812384757, 0.39713871479034424],
                [405.70507345715305, 278.74115004567227, 0.16781297326087952]],
}
MAMMOTH_AS_IS = {
    "losses": [2.3849949836730957, 1.9600180238485336, 1.6848755618557334],
    "anchors": [[329.82638906664215, 215.73057541744225, 0.44619446992874146],
                [328.0632193586789, 213.9893551626347, 0.20271337032318115]],
}


def close(actual, expected) -> None:
    assert actual == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_steps_and_anchors_equal_mammoths(tmp_path):
    write_scenario_mnist(tmp_path, HAL)
    ours = run_ours("hal", str(tmp_path))
    close(ours["losses"], MAMMOTH_UNALIASED["losses"])
    for name, expected in MAMMOTH_UNALIASED["weights"].items():
        close(ours["weights"][name], expected)
    for anchor, expected in zip(ours["anchors"], MAMMOTH_UNALIASED["anchors"], strict=True):
        close(anchor, expected)


def test_mammoths_anchors_are_ours_with_the_network_replaced_by_its_fine_tuned_copy(tmp_path, monkeypatch):
    """What the aliasing does in Mammoth: θ is θ_m when the anchors are learned."""
    write_scenario_mnist(tmp_path, HAL)
    tuned, fine_tuned, frozen = [], Hal.fine_tuned, hal_module.frozen
    monkeypatch.setattr(Hal, "fine_tuned", lambda self: tuned.append(fine_tuned(self)) or tuned[-1])
    monkeypatch.setattr(hal_module, "frozen", lambda net: frozen(tuned[-1]))
    ours = run_ours("hal", str(tmp_path))
    close(ours["losses"], MAMMOTH_AS_IS["losses"])
    for anchor, expected in zip(ours["anchors"], MAMMOTH_AS_IS["anchors"], strict=True):
        close(anchor, expected)


def stream_batch(dataset, task: int, rows):
    split = dataset.train_split(task)
    rows = torch.as_tensor(rows)
    raw = split.images[rows]
    return dataset.train_transform(raw), split.labels[rows], raw, split.indices[rows]


def test_step_is_er_plus_the_anchor_change_under_the_lookahead():
    model, dataset = build_model("--buffer_size", "100", "--minibatch_size", "8", model="hal")
    train_steps(model, dataset, 3, task=0, batch_size=16)
    torch.manual_seed(1)
    model.anchors = torch.rand(3, *model.input_shape)
    inputs, labels, raw, indices = stream_batch(dataset, 1, range(16))
    before, buffer_before = copy.deepcopy(model.net), copy.deepcopy(model.buffer)
    torch.manual_seed(2)
    loss = model.lifecycle.observe(inputs, labels, raw, indices, 1)
    model.lifecycle.step(loss)

    torch.manual_seed(2)  # the same replay draw, from the buffer before this batch joined it
    replay = buffer_before.get_data(8, transform=dataset.train_transform)
    ce = F.cross_entropy(before(torch.cat((inputs, replay["examples"]))), torch.cat((labels, replay["labels"])))
    params = list(before.parameters())
    ahead = copy.deepcopy(before)
    with torch.no_grad():
        for p, g in zip(ahead.parameters(), torch.autograd.grad(ce, params, retain_graph=True)):
            p -= 0.05 * g  # --lr 0.05
        moved = ahead(model.anchors)
    by_hand = ce + 0.1 * (moved - before(model.anchors)).pow(2).mean()  # --hal_lambda 0.1
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    grads = torch.autograd.grad(by_hand, params)
    for (name, p), g in zip(before.named_parameters(), grads):
        torch.testing.assert_close(model.net.get_parameter(name), p - 0.05 * g, rtol=0, atol=1e-6)
    assert len(model.buffer) == 64  # the stream batch is stored, not the replayed rows


def test_phi_is_the_tasks_running_mean_of_the_features_after_each_step():
    model, dataset = build_model("--buffer_size", "50", "--beta", "0.3", model="hal")
    expected = torch.zeros(model.net.head.in_features)
    model.lifecycle.begin_task(0)
    for step in range(4):
        inputs, labels, raw, indices = stream_batch(dataset, 0, range(8 * step, 8 * step + 8))
        model.lifecycle.step(model.lifecycle.observe(inputs, labels, raw, indices, 0))
        with torch.no_grad():
            expected = 0.3 * expected + 0.7 * model.net.features(inputs).mean(0)
        torch.testing.assert_close(model.phi, expected)
    model.lifecycle.end_task(0)
    assert model.phi is None  # restarted for the next task, as Mammoth's `del self.phi`


def test_anchors_descend_the_forgetting_of_the_fine_tuned_copy_from_uniform_starts():
    model, dataset = build_model("--buffer_size", "20", "--batch_size", "32", "--steps_on_anchors", "2",
                                 "--gamma", "0.4", model="hal")
    train_steps(model, dataset, 3, task=0, batch_size=16)
    net, phi, buffer = copy.deepcopy(model.net), model.phi.clone(), copy.deepcopy(model.buffer)
    torch.manual_seed(7)
    model.lifecycle.end_task(0)

    torch.manual_seed(7)
    starts = [torch.rand(model.input_shape) for _ in range(2)]
    replay = buffer.get_data(32, transform=dataset.train_transform)  # the whole buffer of 20
    tuned = copy.deepcopy(net)
    params = list(tuned.parameters())
    step = torch.autograd.grad(F.cross_entropy(tuned(replay["examples"]), replay["labels"]), params)
    with torch.no_grad():
        for p, g in zip(params, step):
            p -= 0.05 * g
    for c, anchor in enumerate(starts):
        for _ in range(2):
            x = anchor.unsqueeze(0).requires_grad_(True)
            target = torch.tensor([c])
            forgetting = (-F.cross_entropy(tuned(x), target) + F.cross_entropy(net(x), target)
                          + 0.4 * (net.features(x) - phi).pow(2).sum())
            anchor = anchor - 0.05 * torch.autograd.grad(forgetting, x)[0][0]
        torch.testing.assert_close(model.anchors[c], anchor, rtol=0, atol=1e-6)
    assert model.anchor_labels.tolist() == [0, 1]
    assert all(p.requires_grad for p in model.net.parameters())  # the copies were frozen, not the network


def test_each_task_adds_an_anchor_per_class():
    model, dataset = build_model("--buffer_size", "30", "--steps_on_anchors", "1", model="hal")
    for task in range(3):
        model.lifecycle.begin_task(task)
        train_steps(model, dataset, 2, task=task, batch_size=8)
        model.lifecycle.end_task(task)
    assert model.anchors.shape == (6, *model.input_shape)
    assert model.anchor_labels.tolist() == [0, 1, 2, 3, 4, 5]
