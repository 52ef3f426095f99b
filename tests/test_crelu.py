"""--mlp_activation crelu: each hidden layer of n units outputs concat(relu(h), relu(−h)), so the layer after it reads
2n inputs and every unit reaches two of its columns (i and i + n); resets, unit statistics and CBP's utility follow
both, and the stacked subset-training kernels (ReLU only) are not used for it."""
from __future__ import annotations

import argparse

import pytest
import torch

from backbones import BACKBONES, FLAGS_ADDED
from plasticity._hidden_units import HiddenUnits
from tests.test_contracts import BASE, BUFFER, HOST, Recorder, check_contract


def make(activation: str, hidden: str = "3,2"):
    torch.manual_seed(0)
    args = argparse.Namespace(mlp_hidden=hidden, mlp_init="torch", mlp_norm="none", mlp_activation=activation)
    return BACKBONES.get("mlp")(args, (1, 1, 2), 2)


def test_the_forward_pass_passes_on_both_signs_of_each_unit():
    net = make("crelu")
    with torch.no_grad():
        net.layers[0].weight.copy_(torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, -1.0]]))
        net.layers[0].bias.copy_(torch.tensor([0.0, 0.0, 0.5]))
        net.layers[1].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]]))
        net.layers[1].bias.zero_()
        net.head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 2.0, 3.0, 0.0]]))
        net.head.bias.copy_(torch.tensor([0.25, 0.0]))
    x = torch.tensor([[[[1.0, -2.0]]]])
    # h1 = (1 − 2, 2, 2 + 0.5) = (−1, 2, 2.5) → (0, 2, 2.5 | 1, 0, 0)
    features = net.layers[0](x.flatten(1))
    assert features.tolist() == [[-1.0, 2.0, 2.5]]
    # h2 = (0 + 0, 2 + 1) = (0, 3) → (0, 3 | 0, 0); logits = (0 + 0 + 0.25, 2·3) = (0.25, 6)
    assert net.features(x).tolist() == [[0.0, 3.0, 0.0, 0.0]]
    assert net(x).tolist() == [[0.25, 6.0]]


def test_the_layer_after_each_crelu_reads_twice_its_units():
    crelu, relu = make("crelu", "6,5"), make("relu", "6,5")
    shapes = [tuple(p.shape) for p in crelu.parameters()]
    assert shapes == [(6, 2), (6,), (5, 12), (5,), (2, 10), (2,)]
    assert [tuple(p.shape) for p in relu.parameters()] == [(6, 2), (6,), (5, 6), (5,), (2, 5), (2,)]
    assert [(g.n_units, g.activation_copies) for g in crelu.hidden_units()] == [(6, 2), (5, 2)]
    assert FLAGS_ADDED["mlp_activation"] == "relu"  # a record without the flag ran a relu mlp


def test_a_reset_unit_zeroes_both_of_its_outgoing_columns_and_their_momentum():
    net = make("crelu", "4,3")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    units = HiddenUnits(net, optimizer)
    net(torch.randn(5, 1, 1, 2)).square().sum().backward()
    optimizer.step()
    params = dict(net.named_parameters())
    momentum = {name: optimizer.state[p]["momentum_buffer"] for name, p in params.items()}
    for index, mask, incoming, reader, columns in ((0, [False, True, False, False], "layers.0", "layers.1.weight", [1, 5]),
                                                   (1, [False, False, True], "layers.1", "head.weight", [2, 5])):
        before = {name: p.detach().clone() for name, p in params.items()}
        units.reset(index, torch.tensor(mask))
        unit = mask.index(True)
        kept = [c for c in range(params[reader].shape[1]) if c not in columns]
        assert (params[reader][:, columns] == 0).all() and (momentum[reader][:, columns] == 0).all(), reader
        assert torch.equal(params[reader][:, kept], before[reader][:, kept]), reader
        assert (momentum[reader][:, kept] != 0).any(), reader
        # the incoming row is drawn afresh and the bias restarts at 0; the other rows stay
        weight, bias = params[f"{incoming}.weight"], params[f"{incoming}.bias"]
        others = [r for r in range(len(mask)) if r != unit]
        assert not torch.equal(weight[unit], before[f"{incoming}.weight"][unit]) and bias[unit] == 0
        assert torch.equal(weight[others], before[f"{incoming}.weight"][others])
    assert units.take_resets() == {"layers.0": 1, "layers.1": 1}


def test_a_unit_is_active_on_either_sign_and_its_utility_reads_both_columns():
    net = make("crelu", "3")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    units = HiddenUnits(net, optimizer)
    with torch.no_grad():
        net.layers[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]))
        net.layers[0].bias.copy_(torch.tensor([0.0, -1.0, 0.0]))  # unit 1 always negative, unit 2 always 0
    x = torch.tensor([[1.0, 5.0], [3.0, -1.0]]).view(2, 1, 1, 2)
    net(x)
    units.monitor.end_step()
    # mean |h| over the inputs: unit 0 (1 + 3)/2, unit 1 (2 + 4)/2, unit 2 0
    torch.testing.assert_close(units.monitor.mean_abs[0], torch.tensor([2.0, 3.0, 0.0]))
    assert units.monitor.age_steps[0].tolist() == [0.0, 0.0, 1.0]  # only the unit with h = 0 is silent
    units.monitor.keep_step_inputs(net)
    net(x)
    units.monitor.end_step()
    torch.testing.assert_close(units.eval_mean_abs()[0], torch.tensor([2.0, 3.0, 0.0], dtype=torch.float64))
    head = net.head.weight.detach()
    torch.testing.assert_close(units.outgoing_weight_sum(0), head[:, :3].abs().sum(0) + head[:, 3:].abs().sum(0))


def test_a_run_with_redo_cbp_and_snr_keeps_the_contract(monkeypatch, tmp_path):
    check_contract(Recorder(monkeypatch, tmp_path), [*BASE, "--dataset", "seq-digits", "--n_tasks", "2", "--model",
                                                     HOST, *BUFFER, "--mlp_activation", "crelu", "--plasticity",
                                                     "redo,cbp,snr", "--redo_every", "5", "--redo_tau", "0.5",
                                                     "--cbp_maturity", "5", "--snr_update_prob", "0.2",
                                                     "--covariates"], n_tasks=2, resume_after=1)


def test_resets_in_a_run_keep_both_columns_of_a_reset_unit_at_zero(monkeypatch, tmp_path):
    """cbp's resets in a run through the task loop: right after a reset, both columns reading the unit are 0."""
    from plasticity.cbp import ContinualBackprop

    seen = []
    reset = HiddenUnits.reset

    def checked_reset(self, index, mask):
        reset(self, index, mask)
        if bool(mask.any()):
            for param, axis in self.groups[index].outgoing:
                halves = param.detach().view(param.shape[0], 2, -1)
                seen.append(bool((halves[:, :, mask] == 0).all()))

    monkeypatch.setattr(HiddenUnits, "reset", checked_reset)
    assert ContinualBackprop.NEEDS_UNITS
    Recorder(monkeypatch, tmp_path).run([*BASE, "--n_tasks", "2", "--model", "sgd", "--mlp_activation", "crelu",
                                         "--plasticity", "cbp", "--cbp_maturity", "5", "--cbp_rho", "0.05"])
    assert seen and all(seen)


def test_subset_training_takes_the_vmapped_path_for_it():
    from memorization.stacked_mlp import StackedMLP
    from memorization.training import Ensemble, build_ensemble, recipe

    training = recipe({"n_epochs": 1, "lr": 0.1, "batch_size": 4, "optimizer": "sgd", "optim_wd": 0.0,
                       "optim_mom": 0.0, "optim_eps": 1e-8, "record_epochs": [1], "save_logits": False})
    assert isinstance(build_ensemble([make("relu"), make("relu")], training), StackedMLP)
    ensemble = build_ensemble([make("crelu"), make("crelu")], training)
    assert isinstance(ensemble, Ensemble)  # the stacked kernels know only ReLU
    x = torch.randn(2, 3, 1, 1, 2)
    torch.testing.assert_close(ensemble(x)[0], make("crelu")(x[0]))


def test_a_checkpoint_without_the_flag_resumes_only_as_a_relu_mlp():
    from continual.args import computational_config, parse_args
    from utils.checkpoint import check_same_config
    from utils.errors import ConfigError

    argv = ["--model", "sgd", "--lr", "0.1", "--n_tasks", "2", "--device", "cpu"]
    saved = computational_config(parse_args(argv))
    del saved["mlp_activation"]  # as written before --mlp_activation existed
    check_same_config("old.pt", saved, computational_config(parse_args(argv)), FLAGS_ADDED)
    with pytest.raises(ConfigError, match="--mlp_activation 'relu' in the checkpoint, 'crelu' now"):
        check_same_config("old.pt", saved, computational_config(parse_args([*argv, "--mlp_activation", "crelu"])),
                          FLAGS_ADDED)


def test_covariates_count_a_unit_once_over_both_outputs_and_rank_all_of_them():
    from continual.covariates import effective_rank, probe_statistics

    net = make("crelu", "3,2")
    with torch.no_grad():
        net.layers[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, 0.0]]))  # unit 2: always 0
        net.layers[0].bias.zero_()
    x = torch.tensor([[1.0, 2.0], [-1.0, 3.0], [2.0, -1.0], [0.5, 0.5]]).reshape(4, 1, 1, 2)
    stats = probe_statistics(net, x, dormant_tau=0.0)
    name = net.hidden_units()[0].name
    # Units 0 and 1 are nonzero on every input, so one of their two outputs is positive: neither is dead;
    # unit 2 outputs 0 on both: dead. The rank is that of all 2n outputs the next layer reads.
    assert stats[f"dead_frac/{name}"] == pytest.approx(1 / 3)
    h = x.flatten(1) @ net.layers[0].weight.T
    outputs = torch.cat([h.relu(), (-h).relu()], dim=1).double()
    assert stats[f"effective_rank/{name}"] == pytest.approx(effective_rank(torch.linalg.svdvals(outputs)), rel=1e-6)
