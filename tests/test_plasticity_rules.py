"""Plasticity methods, each rule checked by hand: the shared reset of hidden units, the regularizers, and the
reset methods."""
from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import pytest
import torch

from backbones import BACKBONES
from plasticity._hidden_units import HiddenUnits
from plasticity.redo import redo_scores
from tests.conftest import build_model as build, train_steps
from utils.lifecycle import StepBatch

SMALL = {
    "mlp": ((1, 8, 8), ["--mlp_hidden", "16,12"]),
    "resnet18": ((3, 8, 8), ["--resnet_width", "4"]),
    "vit": ((3, 8, 8), ["--vit_depth", "2", "--vit_width", "12", "--vit_heads", "3"]),
}


def backbone_with_adam(name: str):
    shape, flags = SMALL[name]
    parser = argparse.ArgumentParser()
    BACKBONES.get(name).add_args(parser)
    net = BACKBONES.get(name)(parser.parse_args(flags), shape, 10)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.rand(16, *shape)
    for _ in range(3):  # optimizer state everywhere, BN statistics away from their start
        optimizer.zero_grad()
        net(x).logsumexp(1).mean().backward()
        optimizer.step()
    return net, optimizer, x


# -- the one reset every method uses ---------------------------------------------------------------
def kill(net, group, mask) -> None:
    """Make the masked units silent on every input: zero incoming weights (and norm scales), bias −1."""
    names = {id(p): n for n, p in net.named_parameters()}
    with torch.no_grad():
        for param, axis in group.incoming:
            shape = [1] * param.dim()
            shape[axis] = -1
            param.masked_fill_(mask.view(shape), -1.0 if names[id(param)].endswith("bias") else 0.0)


@pytest.mark.parametrize("name", list(SMALL))
def test_a_reset_keeps_the_function_zeroes_the_optimizer_state_and_leaves_other_units_alone(name):
    net, optimizer, x = backbone_with_adam(name)
    units = HiddenUnits(net, optimizer)
    net.eval()
    names = {id(p): n for n, p in net.named_parameters()}
    for index, group in enumerate(units.groups):
        torch.manual_seed(index)
        mask = torch.zeros(group.n_units, dtype=torch.bool)
        mask[torch.randperm(group.n_units)[:2]] = True
        # A live unit's reset removes its contribution and nothing else: the output is that of the
        # network with its outgoing weights zeroed, whatever the new incoming weights are.
        silenced = copy.deepcopy(net)
        for param, axis in silenced.hidden_units()[index].outgoing:
            shape = [1] * param.dim()
            shape[axis] = -1
            param.data.masked_fill_(mask.view(shape), 0.0)
        live = copy.deepcopy(net)
        live_units = HiddenUnits(live, torch.optim.Adam(live.parameters()))
        live_units.reset(index, mask)
        with torch.no_grad():
            torch.testing.assert_close(live(x), silenced(x), rtol=0, atol=1e-5)
        # A dormant unit's reset (the case the methods reset) leaves the output exactly as it was.
        kill(net, group, mask)
        with torch.no_grad():
            before = net(x)
        params = {n: p.detach().clone() for n, p in net.named_parameters()}
        states = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in net.named_parameters()}
        units.reset(index, mask)
        with torch.no_grad():
            torch.testing.assert_close(net(x), before, rtol=0, atol=1e-6)
        outgoing = {id(p) for p, _ in group.outgoing}
        for param, axis in group.incoming + group.outgoing:
            n = names[id(param)]
            shape = [1] * param.dim()
            shape[axis] = -1
            touched = mask.view(shape).expand_as(param)
            for key, value in optimizer.state[param].items():
                if value.shape == param.shape:
                    assert (value[touched] == 0).all(), f"{n} {key} of reset units is not zero"
                    assert torch.equal(value[~touched], states[n][key][~touched]), f"{n} {key} of other units changed"
            assert torch.equal(param[~touched], params[n][~touched]), f"{n} changed outside the reset units"
            if id(param) in outgoing or n.endswith("bias"):
                assert (param[touched] == 0).all()
            elif param.dim() > 1:
                assert (param[touched] != 0).any(), f"{n} was not re-drawn"
        untouched = {id(p) for p, _ in group.incoming + group.outgoing}
        for n, param in net.named_parameters():
            if id(param) not in untouched:
                assert torch.equal(param, params[n]), f"{n}, outside the group, changed"
    assert sum(units.take_resets().values()) == 2 * len(units.groups)


@pytest.mark.parametrize("name,check", [
    ("mlp", lambda w, fan_in: w.abs().max() <= 1 / math.sqrt(fan_in)),   # PyTorch's U(±1/√fan_in)
    ("vit", lambda w, fan_in: 0.017 < w.std() < 0.023),  # timm: normal std 0.02 (truncated at ±2)
])
def test_reset_incoming_weights_come_from_the_backbones_initialisation(name, check):
    net, optimizer, _ = backbone_with_adam(name)
    units = HiddenUnits(net, optimizer)
    group = units.groups[0]
    weight, axis = group.incoming[0]
    with torch.no_grad():
        weight.mul_(50)  # trained weights far from the initial scale
    units.reset(0, torch.ones(group.n_units, dtype=torch.bool))
    assert check(weight.detach(), weight[0].numel())


# -- regularizers -----------------------------------------------------------------------------------
def gradients_after(model, dataset) -> dict[str, torch.Tensor]:
    """Gradients as the optimizer sees them (after the regularizers), for one digits batch."""
    split = dataset.train_split(0)
    model.opt.zero_grad()
    model.loss(model.net(dataset.test_transform(split.images[:32])), split.labels[:32]).backward()
    model.plasticity.after_backward()
    return {n: p.grad.clone() for n, p in model.net.named_parameters()}


def test_l2_and_l2init_add_exactly_the_gradient_of_their_penalty():
    plain, dataset = build()
    l2, _ = build("--plasticity", "l2", "--l2_lambda", "0.3")
    l2init, _ = build("--plasticity", "l2init", "--l2init_lambda", "0.2")
    initial = {n: p.detach().clone() for n, p in plain.net.named_parameters()}
    for model in (plain, l2, l2init):
        model.net.load_state_dict(initial)
        with torch.no_grad():
            for p in model.net.parameters():
                p.add_(0.01)  # away from θ₀, so L2Init's gradient is not zero
    base = gradients_after(plain, dataset)
    for name, grad in gradients_after(l2, dataset).items():
        param = dict(l2.net.named_parameters())[name].detach()
        torch.testing.assert_close(grad, base[name] + 2 * 0.3 * param)
    for name, grad in gradients_after(l2init, dataset).items():
        param = dict(l2init.net.named_parameters())[name].detach()
        torch.testing.assert_close(grad, base[name] + 2 * 0.2 * (param - initial[name]))


def test_l2_star_regularizes_only_the_attention_qkv_weights():
    model, _ = build("--dataset", "seq-digits", "--backbone", "vit", "--vit_depth", "2", "--vit_width", "12",
                     "--vit_patch", "4", "--plasticity", "l2", "--l2_params", "qkv")
    (method,) = model.plasticity.methods
    names = {id(p): n for n, p in model.net.named_parameters()}
    assert sorted(names[id(p)] for p in method.params) == ["net.blocks.0.attn.qkv.weight",
                                                           "net.blocks.1.attn.qkv.weight"]


def test_shrink_perturb_shrinks_then_adds_noise_of_the_chosen_kind():
    for noise in ("gaussian", "init"):
        model, dataset = build("--plasticity", "shrink_perturb", "--sp_shrink", "0.5", "--sp_sigma", "0",
                               "--sp_noise", noise)
        (method,) = model.plasticity.methods
        before = [p.detach().clone() for p in model.net.parameters()]
        method.after_step(StepBatch(None, None, None, None, 0, 0))
        for p, old in zip(model.net.parameters(), before):
            torch.testing.assert_close(p.detach(), 0.5 * old)
    # p = 0, σ = 1 leaves exactly the noise: a fresh initialisation (PyTorch's U(±1/√fan_in)) or N(0, 1).
    model, _ = build("--plasticity", "shrink_perturb", "--sp_shrink", "1e-9", "--sp_sigma", "1", "--sp_noise", "init")
    initial = [p.detach().clone() for p in model.net.parameters()]
    model.plasticity.methods[0].after_step(StepBatch(None, None, None, None, 0, 0))
    layer = model.net.layers[0]
    bound = 1 / math.sqrt(layer.in_features)
    assert layer.weight.abs().max() <= bound * 1.0001 and layer.weight.std() > 0.4 * bound
    assert not torch.allclose(layer.weight, initial[0])
    model, _ = build("--plasticity", "shrink_perturb", "--sp_shrink", "1e-9", "--sp_sigma", "1",
                     "--sp_noise", "gaussian")
    model.plasticity.methods[0].after_step(StepBatch(None, None, None, None, 0, 0))
    assert abs(float(model.net.layers[0].weight.detach().std()) - 1) < 0.05


# -- reset methods, rule by rule -------------------------------------------------------------------
def silence(model, layer: int, units: list[int]) -> None:
    """Make hidden units of an MLP layer never fire (zero incoming weights, negative bias)."""
    with torch.no_grad():
        model.net.layers[layer].weight[units] = 0
        model.net.layers[layer].bias[units] = -1


def test_cbp_resets_the_lowest_utility_mature_units_at_the_rate_rho():
    rho, maturity = 0.05, 3
    model, dataset = build("--plasticity", "cbp", "--cbp_rho", str(rho), "--cbp_maturity", str(maturity))
    silence(model, 0, [5])
    (cbp,) = model.plasticity.methods
    train_steps(model, dataset, maturity)
    assert model.plasticity.units.take_resets() == {"layers.0": 0, "layers.1": 0}  # none is mature yet
    useless = set(torch.nonzero(cbp.utility[0] == 0).flatten().tolist())  # the silenced unit and dead ones
    assert 5 in useless and len(useless) >= 5
    train_steps(model, dataset, 1)  # 100 eligible units per layer: c = 0.05 · 100 = 5 resets per layer
    assert model.plasticity.units.take_resets() == {"layers.0": 5, "layers.1": 5}
    reset = set(np.flatnonzero(cbp.age[0] == 0).tolist())  # reset units are newborn
    assert len(reset) == 5 and reset <= useless and (cbp.age[0] == maturity + 1).sum() == 95
    assert cbp.task_metrics(0)["cbp_expected_resets"] == pytest.approx(rho * 200)


def test_cbp_utility_is_the_decayed_contribution():
    model, dataset = build("--plasticity", "cbp", "--cbp_maturity", "1000", "--cbp_decay", "0.9")
    (cbp,) = model.plasticity.methods
    units = model.plasticity.units
    expected = torch.zeros(100)
    for _ in range(3):
        train_steps(model, dataset, 1)
        contribution = units.monitor.mean_abs[0] * model.net.layers[1].weight.detach().abs().sum(0)
        expected = 0.9 * expected + 0.1 * contribution
    torch.testing.assert_close(cbp.utility[0], expected)


def test_redo_normalises_by_the_layer_mean_and_resets_exactly_the_dormant_units():
    scores = redo_scores(torch.tensor([0.0, 0.05, 1.0, 2.95]))
    torch.testing.assert_close(scores, torch.tensor([0.0, 0.05, 1.0, 2.95]))  # layer mean is 1
    assert torch.equal(redo_scores(torch.zeros(3)), torch.zeros(3))
    model, dataset = build("--plasticity", "redo", "--redo_tau", "0.0", "--redo_every", "2")
    silence(model, 0, [3, 7])
    train_steps(model, dataset, 1)
    assert model.plasticity.units.take_resets() == {"layers.0": 0, "layers.1": 0}  # not due yet
    bias = model.net.layers[0].bias.detach().clone()
    train_steps(model, dataset, 1)
    silent = model.plasticity.units.monitor.mean_abs[0] == 0  # the two silenced units and the dead ones
    reset = model.net.layers[0].bias.detach() == 0
    assert model.plasticity.units.take_resets()["layers.0"] == int(silent.sum()) >= 2
    assert torch.equal(reset, silent) and bias[3] == bias[7] == -1


def test_snr_resets_a_unit_silent_for_its_threshold_and_updates_thresholds_by_the_rule():
    model, dataset = build("--plasticity", "snr", "--snr_p", "0.9", "--snr_update_prob", "1.0")
    (snr,) = model.plasticity.methods
    silence(model, 0, [4])
    train_steps(model, dataset, 1)
    # One step: firing units arrived after 1 step (+ the prior of one arrival of one step): λ̂ = 1,
    # τ* = −ln(0.1) = 2.30, so τ = ⌈2.30⌉ = 3; the silent unit has age 1 and no arrival.
    assert snr.tau[0][0] == 3 and snr.tau[0][4] == 3
    monitor = model.plasticity.units.monitor
    train_steps(model, dataset, 1)  # age 2 < 3; re-estimate: τ (3) > τ* → τ = ⌈τ*⌉ = 3
    assert model.plasticity.units.take_resets()["layers.0"] == 0
    silent_twice = monitor.age_steps[0] == 2
    train_steps(model, dataset, 1)  # age 3 ≥ 3: the silenced unit (and any other silent 3 steps) is reset
    silent_thrice = silent_twice & (monitor.step_positive[0] == 0)
    assert silent_thrice[4] and model.plasticity.units.take_resets()["layers.0"] == int(silent_thrice.sum())
    assert monitor.age_steps[0][4] == 0 and model.net.layers[0].bias[4] == 0
    # A threshold at or below τ* doubles.
    snr.tau[0][:] = 1.0
    snr.arrival_sum[0][:] = 10.0
    snr.arrival_count[0][:] = 1.0
    snr.update_thresholds()
    assert snr.tau[0][0] == 2.0 and snr.arrival_sum[0][0] == 1.0


def test_snr_v2_counts_ages_in_tokens_and_sets_thresholds_from_the_token_rate():
    model, dataset = build("--plasticity", "snr_v2", "--snr2_p", "0.6", "--snr2_update_prob", "1.0")
    (snr,) = model.plasticity.methods
    monitor = model.plasticity.units.monitor
    silence(model, 0, [2])
    train_steps(model, dataset, 1, batch_size=32)
    positive = monitor.step_positive[0]
    assert monitor.age_tokens[0][2] == 32  # silent: the step's 32 tokens
    firing = positive > 0
    torch.testing.assert_close(monitor.age_tokens[0][firing], 32 / positive[firing])
    expected = torch.ceil(-math.log(0.4) * 33 / (1 + positive))
    torch.testing.assert_close(snr.tau[0], expected)
