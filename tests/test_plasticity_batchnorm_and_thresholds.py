"""ReDO and the dormant-unit covariate on a BatchNorm network: both score units in eval mode, so ReDO resets
exactly the units the covariate calls dormant; and SNR / SNR-V2 log no threshold before their first estimate."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import main
from backbones import BACKBONES
from continual.args import parse_args
from continual.covariates import dormant_units, probe_statistics
from plasticity import Plasticity
from plasticity._hidden_units import HiddenUnits
from plasticity.redo import redo_scores
from tests.conftest import build_model as build, train_steps
from utils.errors import ConfigError

TAU = 0.025
SHAPE = (3, 16, 16)
# resnet18 at width 4: blocks 0-1 have 4 inner channels, 2-3 have 8, 4-5 have 16, 6-7 have 32.
SILENT_AT_TEST_TIME = (4, [2, 9])  # block, channels whose running statistics put every input below zero
SILENT_ALWAYS = (1, [0])  # block, channels with BatchNorm scale 0 and shift −1


class ResNetWithReDO:
    """A width-4 resnet18 with `--plasticity redo`, stepped on one fixed batch as the task loop steps."""

    def __init__(self, redo_every: int):
        torch.manual_seed(0)
        self.net = BACKBONES.get("resnet18")(argparse.Namespace(resnet_width=4), SHAPE, 10)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.05)
        self.args = argparse.Namespace(plasticity="redo", redo_tau=TAU, redo_every=redo_every, redo_prob=None,
                                       covariates=False, backbone="resnet18")
        self.plasticity = Plasticity(self.net, self.optimizer, self.args)
        self.units = self.plasticity.units
        generator = torch.Generator().manual_seed(1)
        self.x = torch.rand(32, *SHAPE, generator=generator)
        self.y = torch.randint(0, 10, (32,), generator=generator)

    def step(self) -> None:
        self.net.train()
        self.optimizer.zero_grad()
        F.cross_entropy(self.net(self.x), self.y).backward()
        self.plasticity.after_backward()
        self.optimizer.step()
        self.plasticity.after_step()

    def silence_units(self) -> None:
        """Two kinds of dormant units: silent at test time only, and silent in both modes."""
        block, channels = SILENT_AT_TEST_TIME
        always_block, always = SILENT_ALWAYS
        with torch.no_grad():
            bn = self.net.blocks[block].bn1
            bn.running_mean[channels] += 50 * bn.running_var[channels].sqrt()
            self.net.blocks[always_block].bn1.weight[always] = 0
            self.net.blocks[always_block].bn1.bias[always] = -1


def test_redo_resets_exactly_the_units_the_covariate_calls_dormant_on_a_batchnorm_network():
    model = ResNetWithReDO(redo_every=10**6)
    for _ in range(10):  # running statistics that follow the batches
        model.step()
    model.silence_units()
    model.args.redo_every = 1  # the next step checks
    units, net = model.units, model.net
    seen, resets = {}, {}
    score_in_eval_mode, reset = units.eval_mean_abs, units.reset

    def scored_now():
        # The network as ReDO scores it (after the step's update, before any reset of this check).
        seen["covariate"] = dormant_units(net, torch.cat(units.monitor.step_inputs), TAU)
        seen["train_mode"] = [redo_scores(m) <= TAU for m in units.monitor.mean_abs]
        seen["running"] = {name: b.clone() for name, b in net.named_buffers()}
        return score_in_eval_mode()

    def recorded_reset(index, mask):
        resets[units.groups[index].name] = mask.clone()
        reset(index, mask)

    units.eval_mean_abs, units.reset = scored_now, recorded_reset
    model.step()

    names = [g.name for g in units.groups]
    assert list(resets) == names and list(seen["covariate"]) == names
    for name in names:
        assert torch.equal(resets[name], seen["covariate"][name]), name
    block, channels = SILENT_AT_TEST_TIME
    always_block, always = SILENT_ALWAYS
    assert resets[f"blocks.{block}"][channels].all() and resets[f"blocks.{always_block}"][always].all()
    # In train mode the BatchNorm re-centres every channel on its batch: the test-time-silent channels look
    # as active as any other, so a train-mode score would reset only the channels silent in both modes.
    assert not seen["train_mode"][block][channels].any() and seen["train_mode"][always_block][always].all()
    assert sum(int(m.sum()) for m in resets.values()) == model.plasticity.task_metrics(0)["resets"]

    # The reset channels restart their running statistics at 0 and 1 (the others keep theirs), so they are
    # not found dormant again at once.
    bn = net.blocks[block].bn1
    assert (bn.running_mean[channels] == 0).all() and (bn.running_var[channels] == 1).all()
    others = ~resets[f"blocks.{block}"]
    assert torch.equal(bn.running_mean[others], seen["running"][f"blocks.{block}.bn1.running_mean"][others])
    assert (bn.weight[channels] == 1).all() and (bn.bias[channels] == 0).all()
    assert (net.blocks[block].conv2.weight[:, channels] == 0).all()
    after = dormant_units(net, model.x, TAU)
    assert not after[f"blocks.{block}"][channels].any()


def test_dormant_frac_is_the_share_of_the_units_that_dormant_units_flags():
    model = ResNetWithReDO(redo_every=10**6)
    model.step()
    model.silence_units()
    flags = dormant_units(model.net, model.x, TAU, batch_size=8)
    stats = probe_statistics(model.net, model.x, TAU, batch_size=8)
    for group in model.units.groups:
        assert stats[f"dormant_frac/{group.name}"] == flags[group.name].double().mean().item()
    block, channels = SILENT_AT_TEST_TIME
    assert flags[f"blocks.{block}"][channels].all()


def test_redo_counts_its_checks_so_a_run_shorter_than_redo_every_shows_none():
    model = ResNetWithReDO(redo_every=4)
    for _ in range(3):
        model.step()
    assert model.plasticity.task_metrics(0) == {"redo_checks": 0.0, **{f"resets/blocks.{i}": 0.0 for i in range(8)},
                                                 "resets": 0.0}
    for _ in range(8):
        model.step()
    assert model.plasticity.task_metrics(1)["redo_checks"] == 2.0  # steps 4 and 8 of the run


def test_scoring_in_eval_mode_reads_the_last_steps_inputs_and_needs_them():
    net = BACKBONES.get("mlp")(argparse.Namespace(mlp_hidden="8"), (1, 4, 4), 3)
    units = HiddenUnits(net, torch.optim.SGD(net.parameters(), lr=0.1))
    units.monitor.end_step()
    with pytest.raises(ConfigError, match="ran no training-mode forward pass through the whole network"):
        units.eval_mean_abs()
    x = torch.rand(5, 1, 4, 4)
    net.train()
    net(x)
    units.monitor.end_step()
    (mean_abs,) = units.eval_mean_abs()
    with torch.no_grad():
        expected = net.layers[0](x.flatten(1)).relu().abs().mean(0)
    torch.testing.assert_close(mean_abs, expected.double())
    # Without BatchNorm or dropout the eval-mode scores are the train-mode statistics of the step.
    torch.testing.assert_close(mean_abs.float(), units.monitor.mean_abs[0])
    assert net.training and units.monitor.positions == [0] and units.monitor.step_inputs[0] is not None


# -- SNR and SNR-V2 thresholds ------------------------------------------------------------------------
@pytest.mark.parametrize("method,update_flag,key", [("snr", "--snr_update_prob", "snr_threshold_median"),
                                                    ("snr_v2", "--snr2_update_prob", "snr2_threshold_median")])
def test_no_threshold_is_logged_before_the_first_estimate_and_a_finite_one_after(method, update_flag, key):
    model, dataset = build("--plasticity", method, update_flag, "1e-12")
    (snr,) = model.plasticity.methods
    train_steps(model, dataset, 3)
    before = model.plasticity.task_metrics(0)
    assert key not in before and all(math.isfinite(v) for v in before.values())
    snr.update_thresholds()
    train_steps(model, dataset, 1)
    after = model.plasticity.task_metrics(1)
    assert math.isfinite(after[key]) and after[key] >= 1


def test_a_run_before_the_first_estimate_logs_no_threshold_and_nothing_infinite(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    main.run(parse_args(["--model", "sgd", "--lr", "0.05", "--seed", "0", "--device", "cpu", "--n_epochs", "1",
                         "--n_tasks", "2", "--plasticity", "snr_v2", "--snr2_update_prob", "1e-12", "--covariates",
                         "--non_verbose", "--tracking_uri", uri]))
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("continual-learning").experiment_id])
    assert "plasticity/snr2_threshold_median" not in run.data.metrics
    assert "covariates/dormant_frac" in run.data.metrics
    logged = {key: [m.value for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics}
    assert len(logged["covariates/dormant_frac"]) == len(logged["covariates/age_tokens_mean"]) == 2  # both tasks
    # NaN may stand for an undefined covariate; 1.8e308 is what MLflow stores for an infinite value.
    assert not [key for key, values in logged.items() if any(abs(v) >= 1e300 for v in values)]
