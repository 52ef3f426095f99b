"""Plasticity methods in use: composition with each other and with any model, flags and bad input, configs,
and whole runs."""
from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import pytest
import torch

import main
from backbones import BACKBONES, Backbone
from continual.args import parse_args
from plasticity import Plasticity
from tests.conftest import build_model as build, train_steps
from utils.errors import ConfigError


# -- composition and bad input ---------------------------------------------------------------------
@pytest.mark.parametrize("model_name,extra", [("sgd", []), ("er", ["--buffer_size", "50"]),
                                              ("maer", ["--buffer_size", "50", "--buffer_policy", "min"])])
def test_methods_compose_with_each_other_and_with_any_model(model_name, extra):
    model, dataset = build("--plasticity", "snr_v2,l2,cbp", "--cbp_maturity", "1", "--l2_lambda", "1e-4",
                           *extra, model=model_name)
    assert [m.NAME for m in model.plasticity.methods] == ["snr_v2", "l2", "cbp"]
    train_steps(model, dataset, 4)
    assert model.plasticity.step == 4
    assert sum(model.plasticity.units.take_resets().values()) > 0
    assert all(torch.isfinite(p).all() for p in model.net.parameters())


class NoUnits(Backbone):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, 2)

    def features(self, x):
        return x.flatten(1)

    def hidden_units(self):
        return []


def test_a_reset_method_on_a_backbone_without_hidden_units_is_refused():
    net = NoUnits()
    args = argparse.Namespace(plasticity="redo", backbone="linear", covariates=False)
    with pytest.raises(ConfigError, match="lists no hidden units, which redo needs"):
        Plasticity(net, torch.optim.SGD(net.parameters(), lr=0.1), args)


@pytest.mark.parametrize("flags,sentence", [
    (["--plasticity", "dropout"], "unknown plasticity method 'dropout'; known plasticity methods: "),
    (["--cbp_rho", "0.1"], "--cbp_rho belongs to the plasticity method cbp, which is not in --plasticity"),
    (["--plasticity", "l2", "--snr2_p", "0.5"], "--snr2_p belongs to the plasticity method snr_v2"),
    (["--plasticity", "snr", "--snr_p", "1.5"],
     "--snr_p must be in (0, 1) (declared by the plasticity method snr), got 1.5; pass a value in that range"),
    (["--plasticity", "snr_v2", "--snr2_p", "0"],
     "--snr2_p must be in (0, 1) (declared by the plasticity method snr_v2), got 0.0; pass a value in that range"),
    (["--plasticity", "l2", "--l2_lambda=-1e-4"],
     "--l2_lambda must be in [0, inf) (declared by the plasticity method l2), got -0.0001"),
    (["--plasticity", "l2init", "--l2init_lambda=-1"],
     "--l2init_lambda must be in [0, inf) (declared by the plasticity method l2init), got -1.0"),
    (["--plasticity", "redo", "--redo_prob", "2"],
     "--redo_prob must be in (0, 1] (declared by the plasticity method redo), got 2.0"),
    (["--plasticity", "redo", "--redo_every", "0"],
     "--redo_every must be in [1, inf) (declared by the plasticity method redo), got 0"),
    (["--plasticity", "cbp", "--cbp_decay", "1"],
     "--cbp_decay must be in (0, 1) (declared by the plasticity method cbp), got 1.0"),
    (["--plasticity", "shrink_perturb", "--sp_shrink", "0"],
     "--sp_shrink must be in (0, 1] (declared by the plasticity method shrink_perturb), got 0.0"),
    (["--plasticity", "l2,l2"], "--plasticity lists a method twice"),
    (["--plasticity", "l2", "--l2_params", "qkv"], "does not have; use --l2_params all or a vit backbone"),
    (["--log_every", "10"], "--log_every N logs covariates every N steps; add --covariates"),
])
def test_bad_plasticity_input_ends_with_one_sentence(flags, sentence, tmp_path, capsys):
    argv = ["--model", "sgd", "--lr", "0.1", "--device", "cpu", "--n_tasks", "1", "--non_verbose",
            "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}", *flags]
    assert main.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and sentence in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags", [["--plasticity", "head_reset"], ["--reset_head"]], ids=["head_reset", "deprecated"])
def test_head_reset_zeroes_the_output_layer_at_each_new_task_before_the_model_acts(tmp_path, flags, capsys):
    state = main.run(parse_args(["--model", "sgd", "--lr", "0.05", "--seed", "0", "--device", "cpu",
                                 "--n_epochs", "1", "--n_tasks", "2", "--dataset", "perm-digits", *flags,
                                 "--non_verbose", "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}"]))
    assert len(state.history["terminal_test_acc"]) == 2
    assert state.history["plasticity/head_resets"] == [0.0, 1.0]
    model, dataset = build(*flags, "--dataset", "perm-digits", "--n_tasks", "2", "--optimizer", "adam")
    assert model.args.plasticity == "head_reset"
    from benchmarks.engine_throughput import SilentLogger as Silent
    from continual.records import RunRecords
    from continual.training import RunState, train_task

    train_task(model, dataset, 0, model.args, RunRecords(Silent()), RunState.fresh(dataset))
    head = copy.deepcopy(model.net.head)
    assert head.weight.abs().sum() > 0
    model.args.n_epochs = 1
    seen = []
    model.begin_task = lambda task: seen.append(  # the model's own begin_task sees the reset head
        (model.net.head.weight.abs().sum().item(), model.opt.state[model.net.head.weight]["exp_avg"].abs().sum().item()))
    train_task(model, dataset, 1, model.args, RunRecords(Silent()), RunState.fresh(dataset))
    assert seen == [(0.0, 0.0)]
    if flags == ["--reset_head"]:
        assert "--reset_head is deprecated" in capsys.readouterr().err


def test_head_reset_redraw_draws_a_new_head_from_the_initialisation():
    model, dataset = build("--plasticity", "head_reset", "--head_reset_mode", "redraw")
    (method,) = model.plasticity.methods
    before = copy.deepcopy(model.net.head)
    method.begin_task(0)  # the first task keeps its head
    assert torch.equal(before.weight, model.net.head.weight)
    draws = []
    for task in (1, 2):
        method.begin_task(task)
        draws.append(model.net.head.weight.detach().clone())
    assert not torch.equal(draws[0], before.weight) and not torch.equal(draws[0], draws[1])
    assert model.net.head.bias.abs().max() > 0 or model.net.init == "xavier"  # PyTorch's init draws biases
    bound = 1 / math.sqrt(model.net.head.in_features)
    assert draws[1].abs().max() <= bound * 1.0001 and draws[1].std() > 0.4 * bound


@pytest.mark.parametrize("file,depth,width", [("vit_l3.yaml", 3, 48), ("vit_l12.yaml", 12, 192)])
def test_the_seed_vit_configs_give_the_seed_network_and_optimizer(file, depth, width):
    from tests.conftest import REPO_ROOT

    args = parse_args(["--config", str(REPO_ROOT / "configs" / file), "--model", "sgd", "--device", "cpu",
                       "--lr", "1e-4"])
    assert (args.dataset, args.backbone, args.vit_depth, args.vit_width, args.vit_heads, args.vit_patch) == \
        ("continual-imagenet", "vit", depth, width, 3, 4)
    assert (args.optimizer, args.optim_eps, args.batch_size, args.n_epochs, args.last_k) == ("adam", 1e-7, 100, 10, [50, 10])
    assert args.lr == 1e-4 and args.eval_scope == "current"  # a flag given explicitly wins over the file
    net = BACKBONES.get("vit")(args, (3, 32, 32), 2)
    groups = net.hidden_units()
    assert len(groups) == depth and all(g.n_units == 4 * width for g in groups)
    assert isinstance(groups[0].activation, torch.nn.ReLU)
    assert net.net.patch_embed.num_patches + 1 == 65  # 64 patches and the class token
    assert all(block.norm1 is not None for block in net.net.blocks)  # pre-LN


def test_a_config_with_an_unknown_flag_is_refused(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("vit_depht: 3\nlr: 0.1\n")
    assert main.main(["--config", str(config), "--model", "sgd", "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert "sets vit_depht, which no chosen component declares" in capsys.readouterr().err


def test_a_long_stream_reports_terminal_accuracies_and_their_last_k_means(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    state = main.run(parse_args(["--model", "sgd", "--lr", "0.05", "--seed", "0", "--device", "cpu", "--n_epochs", "1",
                                 "--n_tasks", "4", "--dataset", "perm-digits", "--last_k", "2,3,4,10", "--non_verbose",
                                 "--tracking_uri", uri]))
    console = capsys.readouterr().out
    matrix = state.matrices["domain_il"]
    terminal = np.diag(matrix)
    assert np.isfinite(terminal).all() and np.isnan(matrix[~np.eye(4, dtype=bool)]).all()  # current task only
    assert state.history["terminal_test_acc"] == terminal.tolist()
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("continual-learning").experiment_id])[0]
    assert run.data.metrics["terminal_test_acc_last_2"] == pytest.approx(terminal[-2:].mean())
    assert run.data.metrics["terminal_test_acc_last_3"] == pytest.approx(terminal[-3:].mean())
    # a window is logged once it is full, and only when the run has more tasks than it: none of 4 or 10
    window = client.get_metric_history(run.info.run_id, "terminal_test_acc_last_3")
    assert sorted((m.step, round(m.value, 6)) for m in window) == [
        (3, round(terminal[:3].mean(), 6)), (4, round(terminal[1:].mean(), 6))]
    assert not {k for k in run.data.metrics if k.endswith(("_last_4", "_last_10"))}
    assert "last 3:" in console and "last 4:" not in console and "last 10:" not in console
    history = client.get_metric_history(run.info.run_id, "train_acc/terminal")
    assert [m.step for m in history] == [1, 2, 3, 4] and all(0 <= m.value <= 100 for m in history)
    assert run.data.metrics["train_acc/terminal_last_2"] == pytest.approx(np.mean([m.value for m in history][-2:]))
    assert len(client.get_metric_history(run.info.run_id, "epoch/train_loss")) == 4  # one epoch per task
