"""--plasticity injection (Nikishin et al. 2023): at a task boundary the output layer freezes and the output becomes
frozen(z) + new(z) − new0(z), unchanged at that moment; afterwards only the new layer (and the features) learn, runs
through the task loop learn and resume, and methods that would move the frozen layer are refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from continual.args import parse_args
from plasticity.injection import InjectedHead
from tests.conftest import build_model, train_steps
from tests.test_contracts import BASE, BUFFER, HOST, Recorder, check_contract
from utils.errors import ConfigError

DIGITS = ["--dataset", "seq-digits", "--mlp_hidden", "16,16", "--optim_mom", "0.9"]


def injected(*flags: str):
    model, dataset = build_model(*DIGITS, "--plasticity", "injection", *flags)
    return model, dataset, model.plasticity.methods[-1], model.net.head


def probe(dataset, task: int = 0) -> torch.Tensor:
    return dataset.test_transform(dataset.train_split(task).images[:64])


def test_the_output_is_unchanged_at_an_injection():
    model, dataset, method, head = injected()
    train_steps(model, dataset, 5)
    x = probe(dataset)
    with torch.no_grad():
        before, trained = model.net(x), head.new.weight.clone()
    method.begin_task(1)
    with torch.no_grad():
        assert torch.equal(model.net(x), before)  # bit for bit
    assert torch.equal(head.frozen.weight, trained) and torch.equal(head.initial.weight, head.new.weight)
    assert not torch.equal(head.new.weight, trained)  # a fresh draw of the initialisation
    assert (model.opt.state[head.new.weight]["momentum_buffer"] == 0).all()  # the old head's momentum is gone
    train_steps(model, dataset, 5, task=1)
    with torch.no_grad():
        before = model.net(x)
        method.begin_task(2)  # a later injection folds the earlier terms into the frozen layer
        torch.testing.assert_close(model.net(x), before, rtol=1e-6, atol=1e-6)
    assert head.injections == 2 and method.task_metrics(2) == {"injections": 2.0}


def test_the_output_is_the_frozen_layer_plus_the_new_one_minus_its_initial_copy():
    model, dataset, method, head = injected()
    method.begin_task(1)
    train_steps(model, dataset, 3, task=1)
    z = model.net.features(probe(dataset, 1))
    expected = (F.linear(z, head.frozen.weight, head.frozen.bias)
                + (F.linear(z, head.new.weight, head.new.bias) - F.linear(z, head.initial.weight, head.initial.bias)))
    torch.testing.assert_close(model.net.head(z), expected, rtol=0, atol=0)


@pytest.mark.parametrize("methods", ["injection", "injection,l2"])  # l2's penalty reaches every parameter's .grad
def test_after_an_injection_only_the_new_layer_and_the_features_learn(methods):
    model, dataset, method, head = injected("--plasticity", methods)
    method = model.plasticity.methods[0]
    train_steps(model, dataset, 3)
    method.begin_task(1)
    before = {name: p.detach().clone() for name, p in model.net.named_parameters()}
    train_steps(model, dataset, 5, task=1)
    moved = {name for name, p in model.net.named_parameters() if not torch.equal(p, before[name])}
    assert moved == {"layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
                     "head.new.weight", "head.new.bias"}
    frozen = {name for name, p in model.net.named_parameters() if not p.requires_grad}
    assert frozen == {"head.frozen.weight", "head.frozen.bias", "head.initial.weight", "head.initial.bias"}
    assert {id(p) for g in model.opt.param_groups for p in g["params"]} >= {id(head.new.weight), id(head.new.bias)}


def test_injection_every_k_tasks():
    model, dataset, method, head = injected("--injection_every", "2")
    for task in range(5):
        method.begin_task(task)
    assert head.injections == 2  # at tasks 2 and 4


def test_a_reset_unit_of_the_last_hidden_layer_leaves_all_three_head_layers():
    model, dataset, method, head = injected("--plasticity", "redo,injection")
    train_steps(model, dataset, 3)
    method.begin_task(1)
    train_steps(model, dataset, 3, task=1)
    units = model.plasticity.units
    last = len(units.groups) - 1
    assert {id(p) for p, _ in units.groups[last].outgoing} == {id(head.new.weight), id(head.frozen.weight),
                                                                  id(head.initial.weight)}
    units.reset(last, units.unit_mask(last, torch.tensor([3])))
    for layer in (head.frozen, head.new, head.initial):
        assert (layer.weight[:, 3] == 0).all() and (layer.weight[:, [2, 4]] != 0).all()


def test_a_run_through_the_task_loop_learns_after_each_injection(monkeypatch, tmp_path):
    recorder = Recorder(monkeypatch, tmp_path)
    state = recorder.run([*BASE, "--n_epochs", "10", "--n_tasks", "5", "--model", "sgd", "--plasticity", "injection"])
    model = recorder.models[0]
    assert model.net.head.injections == 4
    # each task, two digit classes, is learnt after the injection at its start (chance: 50% task-IL)
    assert (np.diag(state.matrices["task_il"]) > 90).all(), state.matrices["task_il"]


def test_a_run_resumed_across_injections_ends_where_the_whole_run_ends(monkeypatch, tmp_path):
    check_contract(Recorder(monkeypatch, tmp_path), [*BASE, "--n_tasks", "5", "--model", HOST, *BUFFER,
                                                     "--mlp_activation", "crelu", "--plasticity", "injection,redo",
                                                     "--redo_every", "5", "--redo_tau", "0.5", "--covariates"],
                   n_tasks=5, resume_after=3)


@pytest.mark.parametrize("flags,sentence", [
    (["--plasticity", "injection,head_reset"], "head_reset restarts the output layer"),
    (["--plasticity", "shrink_perturb,injection"], "shrink_perturb shrinks and perturbs every parameter"),
])
def test_methods_that_would_move_the_frozen_layer_are_refused(flags, sentence):
    with pytest.raises(ConfigError, match=sentence):
        parse_args(["--model", "sgd", "--lr", "0.1", *flags])


def test_a_head_that_is_not_linear_is_refused():
    with pytest.raises(ConfigError, match="head is a CosineHead; .*--use_custom_classifier 0"):
        build_model("--plasticity", "injection", "--buffer_size", "10", model="er_ace")
    model, _ = build_model("--plasticity", "injection", "--buffer_size", "10", "--use_custom_classifier", "0",
                           model="er_ace")
    assert isinstance(model.net.head, InjectedHead)
