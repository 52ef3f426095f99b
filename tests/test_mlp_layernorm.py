"""--mlp_norm layernorm: the MLP with a LayerNorm between each hidden layer and its ReLU, its units (the norm's
scale and shift belong to the unit) and a whole run with resets through the contract."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from backbones import BACKBONES
from plasticity._hidden_units import HiddenUnits
from tests.test_contracts import BASE, BUFFER, HOST, Recorder, check_contract


def make(norm: str):
    torch.manual_seed(0)
    return BACKBONES.get("mlp")(argparse.Namespace(mlp_hidden="6,5", mlp_init="torch", mlp_norm=norm), (1, 2, 2), 3)


def test_the_forward_pass_normalises_each_hidden_layer_before_its_relu():
    net = make("layernorm")
    x = torch.randn(4, 1, 2, 2)
    h = x.flatten(1)
    for layer, norm in zip(net.layers, net.norms):
        h = torch.relu(torch.nn.functional.layer_norm(layer(h), (layer.out_features,), norm.weight, norm.bias))
    torch.testing.assert_close(net(x), net.head(h))
    plain = make("none")
    assert plain.norms is None and all(not isinstance(m, torch.nn.LayerNorm) for m in plain.modules())


def test_a_reset_unit_gets_its_norm_scale_and_shift_back():
    net = make("layernorm")
    units = HiddenUnits(net, torch.optim.SGD(net.parameters(), lr=0.1))
    assert [len(g.incoming) for g in units.groups] == [4, 4]  # weight, bias, the norm's scale and shift
    with torch.no_grad():
        net.norms[0].weight.fill_(3.0)
        net.norms[0].bias.fill_(-2.0)
    units.reset(0, torch.tensor([True, False, False, False, False, False]))
    assert net.norms[0].weight[0] == 1 and net.norms[0].bias[0] == 0  # LayerNorm's initialisation
    assert (net.norms[0].weight[1:] == 3).all() and (net.norms[0].bias[1:] == -2).all()


def test_a_run_with_resets_keeps_the_contract(monkeypatch, tmp_path):
    check_contract(Recorder(monkeypatch, tmp_path), [*BASE, "--dataset", "seq-digits", "--n_tasks", "2", "--model",
                                                     HOST, *BUFFER, "--mlp_norm", "layernorm", "--plasticity",
                                                     "redo", "--redo_every", "5"], n_tasks=2, resume_after=1)


def test_subset_training_takes_the_vmapped_path_for_it():
    from memorization.stacked_mlp import StackedMLP
    from memorization.training import Ensemble, build_ensemble, recipe

    training = recipe({"n_epochs": 1, "lr": 0.1, "batch_size": 4, "optimizer": "sgd", "optim_wd": 0.0,
                       "optim_mom": 0.0, "optim_eps": 1e-8, "record_epochs": [1], "save_logits": False})
    assert isinstance(build_ensemble([make("none"), make("none")], training), StackedMLP)
    ensemble = build_ensemble([make("layernorm"), make("layernorm")], training)
    assert isinstance(ensemble, Ensemble)  # the stacked kernels know no LayerNorm
    x = torch.randn(2, 3, 1, 2, 2)
    torch.testing.assert_close(ensemble(x)[0], make("layernorm")(x[0]))


def test_a_checkpoint_written_before_the_flag_resumes_as_a_plain_mlp(tmp_path):
    from continual.args import parse_args
    from continual.run import run
    from utils.checkpoint import load_checkpoint, save_checkpoint
    from utils.errors import ConfigError
    from utils.mlflow_logger import RecordingLogger

    argv = ["--model", "sgd", "--lr", "0.1", "--n_epochs", "1", "--n_tasks", "2", "--seed", "1", "--non_verbose",
            "1", "--no_figures", "--savecheck", "task", "--checkpoint_dir", str(tmp_path)]
    whole = run(parse_args(argv), logger=RecordingLogger("whole"))
    path = next(tmp_path.glob("*_task1.pt"))
    checkpoint = load_checkpoint(path)
    del checkpoint["config"]["mlp_norm"]  # as written before --mlp_norm existed
    save_checkpoint(path, checkpoint)
    resumed = run(parse_args([*argv, "--resume", str(path)]), logger=RecordingLogger("resumed"))
    np.testing.assert_array_equal(resumed.matrices["class_il"], whole.matrices["class_il"])
    with pytest.raises(ConfigError, match="--mlp_norm 'none' in the checkpoint, 'layernorm' now"):
        run(parse_args([*argv, "--resume", str(path), "--mlp_norm", "layernorm"]), logger=RecordingLogger("other"))
