"""Plasticity covariates: ranks, dead/dormant/low-activity fractions, attention entropy, weights, ages, plots."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from backbones import BACKBONES
from utils.covariate_plots import COVARIATE_PLOTS, age_histogram, close, covariate_figure
from continual.covariates import (
    age_statistics, effective_rank, probe_statistics, singular_values_from_gram, stable_rank,
    weight_magnitudes,
)


def make_mlp(hidden: str = "8,8", shape=(1, 8, 8)):
    torch.manual_seed(0)
    return BACKBONES.get("mlp")(argparse.Namespace(mlp_hidden=hidden), shape, 10)


def make_vit():
    torch.manual_seed(0)
    args = argparse.Namespace(vit_depth=2, vit_width=12, vit_heads=3, vit_patch=4, vit_mlp_ratio=4.0,
                              vit_act="relu")
    return BACKBONES.get("vit")(args, (3, 8, 8), 10)


def capture(module: torch.nn.Module, backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The output of `module` when the backbone (in eval mode) runs on `images`."""
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    backbone.eval()
    with torch.no_grad():
        backbone(images)
    handle.remove()
    return torch.cat(seen)


def orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator)).Q


# --- ranks ---------------------------------------------------------------------------------------


def test_effective_rank_of_known_singular_values_by_svd_and_gram():
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    u, v = orthogonal(50, g)[:, :4], orthogonal(4, g)
    features = u @ torch.diag(sigma) @ v.T  # [50, 4] with singular values 3, 1, 0, 0
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    by_svd = torch.linalg.svdvals(features)
    by_gram = singular_values_from_gram(features.T @ features)
    assert effective_rank(by_svd) == pytest.approx(expected, abs=1e-9)
    assert effective_rank(by_gram) == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(by_gram, by_svd, atol=1e-6)
    assert stable_rank(by_gram) == 2.0  # 3 / 4 < 0.99 ≤ 4 / 4
    assert effective_rank(torch.zeros(4)) == 0.0 and stable_rank(torch.zeros(4)) == 0.0


def test_gram_path_equals_svdvals_on_a_random_tall_matrix():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(300, 16, dtype=torch.float64, generator=g) * torch.linspace(0.1, 3, 16, dtype=torch.float64)
    assert torch.allclose(singular_values_from_gram(features.T @ features), torch.linalg.svdvals(features),
                          rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sigma,expected", [
    ([10, 1, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05], 6),  # 0.99·11.3 = 11.187: 11.15 < it ≤ 11.20
    ([10, 1, 0.05], 2),  # 0.99·11.05 = 10.9395: 10 < it ≤ 11
    ([100, 1], 1),  # 0.99·101 = 99.99 ≤ 100
    ([1, 1, 1, 1], 4),
    ([0.05, 1, 10], 2),  # order does not matter
])
def test_stable_rank_is_dohares_99_percent_count(sigma, expected):
    assert stable_rank(torch.tensor(sigma, dtype=torch.float64)) == expected


# --- dead / dormant / low activity on an MLP -------------------------------------------------------


def rigged_mlp_and_probe():
    """Layer 0: units 0, 1 dead, unit 2 tiny (×1e-4), unit 3 active on 1 of 200 inputs; layer 1: unit 5 dead."""
    backbone = make_mlp()
    with torch.no_grad():
        first, second = backbone.layers
        first.weight[0:2] = 0
        first.bias[0:2] = -1
        first.weight[2] *= 1e-4
        first.bias[2] *= 1e-4
        first.weight[3] = 0
        first.weight[3, 0] = 1
        first.bias[3] = -50
        second.weight[5] = 0
        second.bias[5] = -1
    images = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    images[0, 0, 0, 0] = 100  # the only input on which unit 3 fires
    return backbone, images


def test_dead_dormant_and_low_activity_fractions_are_exact():
    backbone, images = rigged_mlp_and_probe()
    h0 = capture(backbone.activations[0], backbone, images)
    assert (h0[:, 3] > 0).sum() == 1 and (h0[:, 2] > 0).any()  # the rig works as intended
    stats = probe_statistics(backbone, images, dormant_tau=0.025, batch_size=64)  # chunks 64,64,64,8
    assert stats["dead_frac/layers.0"] == 2 / 8
    assert stats["low_activity_frac/layers.0"] == 3 / 8  # dead units and unit 3 (0.5% < 1%)
    assert stats["dormant_frac/layers.0"] == 3 / 8  # dead units and the tiny unit 2
    assert stats["dead_frac/layers.1"] == 1 / 8
    # Layer 1 by hand: units active on fewer than 2 of the 200 inputs (here the dead unit 5 and two
    # units that fire only on the outlier input).
    h1 = capture(backbone.activations[1], backbone, images)
    low1 = ((h1 > 0).sum(0) < 0.01 * 200).sum().item()
    assert low1 == 3
    assert stats["low_activity_frac/layers.1"] == low1 / 8
    assert stats["dead_frac"] == 3 / 16
    assert stats["low_activity_frac"] == (3 + low1) / 16
    assert stats["dormant_frac"] == (3 + 8 * stats["dormant_frac/layers.1"]) / 16
    for key in ("dead_frac", "dormant_frac", "low_activity_frac", "effective_rank", "stable_rank"):
        assert f"{key}/layers.0" in stats and f"{key}/layers.1" in stats
    assert not any(key.startswith("attn_entropy") for key in stats)
    # Ranks: the [200, 8] feature matrix, computed directly, and their means over the groups.
    for i in range(2):
        h = capture(backbone.activations[i], backbone, images).double()
        sigma = torch.linalg.svdvals(h)
        assert stats[f"effective_rank/layers.{i}"] == pytest.approx(effective_rank(sigma), abs=1e-6)
        assert stats[f"stable_rank/layers.{i}"] == stable_rank(sigma)
    assert stats["effective_rank_mean"] == pytest.approx(
        (stats["effective_rank/layers.0"] + stats["effective_rank/layers.1"]) / 2)
    assert stats["effective_rank/layers.0"] <= 6 + 1e-6  # two dead units: rank ≤ 6


def test_redo_score_is_normalised_by_the_layer_mean_not_the_sum():
    backbone, images = rigged_mlp_and_probe()
    h1 = capture(backbone.activations[1], backbone, images).double()
    mean_abs = h1.abs().mean(0)
    score = mean_abs / mean_abs.mean()
    assert score.mean().item() == pytest.approx(1.0)
    alive = score[score > 0].sort().values
    # A threshold between the 3rd and 4th smallest live scores: dead unit + 3 units are dormant.
    tau = ((alive[2] + alive[3]) / 2).item()
    expected = ((score <= tau).sum() / 8).item()
    assert expected == 4 / 8
    stats = probe_statistics(backbone, images, dormant_tau=tau)
    assert stats["dormant_frac/layers.1"] == expected
    by_sum = ((mean_abs / mean_abs.sum()) <= tau).double().mean().item()
    assert by_sum != expected  # normalising by the sum would flag more units


def test_an_all_zero_layer_is_entirely_dormant_and_has_rank_zero():
    backbone = make_mlp()
    with torch.no_grad():
        backbone.layers[0].weight.zero_()
        backbone.layers[0].bias.fill_(-1)
    stats = probe_statistics(backbone, torch.randn(20, 1, 8, 8), dormant_tau=0.0)
    assert stats["dead_frac/layers.0"] == 1.0
    assert stats["dormant_frac/layers.0"] == 1.0
    assert stats["low_activity_frac/layers.0"] == 1.0
    assert stats["effective_rank/layers.0"] == 0.0 and stats["stable_rank/layers.0"] == 0.0


def test_probe_restores_the_modes_and_removes_the_hooks():
    backbone, images = rigged_mlp_and_probe()
    backbone.train()
    backbone.layers[1].eval()  # a mixed state must come back exactly
    probe_statistics(backbone, images, dormant_tau=0.1)
    assert backbone.training and backbone.layers[0].training and not backbone.layers[1].training
    for group in backbone.hidden_units():
        assert not group.activation._forward_hooks


# --- conv ------------------------------------------------------------------------------------------


def test_resnet_groups_and_rank_of_spatial_means():
    torch.manual_seed(0)
    backbone = BACKBONES.get("resnet18")(argparse.Namespace(resnet_width=4), (3, 32, 32), 10)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    stats = probe_statistics(backbone, images, dormant_tau=0.1, batch_size=4)
    groups = backbone.hidden_units()
    assert len(groups) == 8
    for group in groups:
        for key in ("dead_frac", "dormant_frac", "low_activity_frac"):
            assert 0.0 <= stats[f"{key}/{group.name}"] <= 1.0
        # [6, C] spatial means: rank ≤ min(6 images, C channels), though there are 6·H·W positions.
        assert 0 < stats[f"effective_rank/{group.name}"] <= min(6, group.n_units) + 1e-6
        assert 1 <= stats[f"stable_rank/{group.name}"] <= min(6, group.n_units)
    # blocks.7 has 32 channels on 4×4 positions; the rank is that of the [6, 32] spatial means.
    h = capture(backbone.blocks[7].act1, backbone, images).double()
    sigma = torch.linalg.svdvals(h.mean(dim=(2, 3)))
    assert stats["effective_rank/blocks.7"] == pytest.approx(effective_rank(sigma), abs=1e-5)
    units = h.movedim(1, -1).reshape(-1, 32)
    assert stats["dead_frac/blocks.7"] == (units > 0).sum(0).eq(0).double().mean().item()


# --- ViT -------------------------------------------------------------------------------------------


def test_vit_attention_entropy_is_one_for_uniform_attention():
    backbone = make_vit()
    width = 12
    with torch.no_grad():
        for attn in backbone.attention_modules():
            attn.qkv.weight[: 2 * width] = 0  # queries and keys
            attn.qkv.bias[: 2 * width] = 0
    stats = probe_statistics(backbone, torch.randn(5, 3, 8, 8), dormant_tau=0.1, batch_size=2)
    for i in range(2):
        assert stats[f"attn_entropy_mean/L{i}"] == pytest.approx(1.0, abs=1e-5)
        assert stats[f"attn_entropy_std/L{i}"] == pytest.approx(0.0, abs=1e-5)
    assert stats["attn_entropy_mean"] == pytest.approx(1.0, abs=1e-5)


def test_vit_entropy_range_restored_flags_and_token_rows():
    backbone = make_vit()
    with torch.no_grad():  # sharpen the attention so the entropy is visibly below 1
        for attn in backbone.attention_modules():
            attn.qkv.weight[: 24] *= 20
    attention = backbone.attention_modules()
    attention[0].fused_attn, attention[1].fused_attn = True, False
    backbone.train()
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    stats = probe_statistics(backbone, images, dormant_tau=0.1)
    assert [a.fused_attn for a in attention] == [True, False]
    assert all(module.training for module in backbone.modules())
    for attn in attention:
        assert not attn.attn_drop._forward_pre_hooks and not attn.attn_drop._forward_hooks
    for group in backbone.hidden_units():
        assert not group.activation._forward_hooks
    for i in range(2):
        assert 0.0 <= stats[f"attn_entropy_mean/L{i}"] < 1.0
        assert stats[f"attn_entropy_std/L{i}"] > 0
    # Hand computation of block 0's entropy from the attention probabilities.
    block = backbone.net.blocks[0].attn
    seen = []
    block.fused_attn = False
    handle = block.attn_drop.register_forward_pre_hook(lambda m, i: seen.append(i[0].double()))
    capture(block, backbone, images)
    handle.remove()
    block.fused_attn = True
    a = seen[0]  # [2, 3 heads, 5 tokens, 5 tokens]
    entropy = -(a * a.log()).sum(-1) / math.log(5)
    assert stats["attn_entropy_mean/L0"] == pytest.approx(entropy.mean().item(), abs=1e-9)
    assert stats["attn_entropy_std/L0"] == pytest.approx(entropy.std(correction=0).item(), abs=1e-7)
    # Rows of the MLP feature matrix are inputs × tokens: [2·5, 48], so the rank can exceed 2 inputs.
    h = capture(backbone.net.blocks[0].mlp.act, backbone, images).double().reshape(-1, 48)
    assert stats["effective_rank/blocks.0.mlp"] == pytest.approx(
        effective_rank(torch.linalg.svdvals(h)), abs=1e-5)
    assert stats["effective_rank/blocks.0.mlp"] > 2
    assert set(stats) >= {"dead_frac/blocks.0.mlp", "dormant_frac/blocks.1.mlp", "attn_entropy_mean"}


# --- weights and ages ------------------------------------------------------------------------------


def test_weight_magnitudes_by_hand():
    backbone = make_mlp("3", (1, 2, 2))  # layers.0.weight [3, 4], head.weight [10, 3]
    with torch.no_grad():
        backbone.layers[0].weight.copy_(torch.arange(12.0).reshape(3, 4) - 6)  # |w| sum 36
        backbone.layers[0].bias.fill_(100)  # biases are not weights
        backbone.head.weight.fill_(-0.5)  # |w| sum 15
    result = weight_magnitudes(backbone)
    assert set(result) == {"weight_mean_abs/layers.0.weight", "weight_mean_abs/head.weight", "weight_mean_abs"}
    assert result["weight_mean_abs/layers.0.weight"] == pytest.approx(36 / 12)
    assert result["weight_mean_abs/head.weight"] == pytest.approx(0.5)
    assert result["weight_mean_abs"] == pytest.approx((36 + 15) / 42)


def test_age_statistics_match_numpy_percentiles():
    g = torch.Generator().manual_seed(5)
    ages = {"layers.0": torch.randint(0, 1000, (37,), generator=g), "layers.1": torch.rand(10, generator=g) * 50}
    result = age_statistics(ages, "steps")
    everything = np.concatenate([a.double().numpy() for a in ages.values()])
    for name, a in ages.items():
        values = a.double().numpy()
        assert result[f"age_steps_mean/{name}"] == pytest.approx(values.mean())
        assert result[f"age_steps_median/{name}"] == pytest.approx(np.percentile(values, 50))
        assert result[f"age_steps_p90/{name}"] == pytest.approx(np.percentile(values, 90))
        assert result[f"age_steps_p90/{name}"] == pytest.approx(torch.quantile(a.double(), 0.9).item())
        assert result[f"age_steps_max/{name}"] == values.max()
    assert result["age_steps_mean"] == pytest.approx(everything.mean())
    assert result["age_steps_p90"] == pytest.approx(np.percentile(everything, 90))
    assert age_statistics({"g": torch.tensor([1.0, 2.0, 3.0, 4.0])}, "tokens")["age_tokens_median/g"] == 2.5


# --- plots -----------------------------------------------------------------------------------------


def test_covariate_figure_draws_one_line_per_group_plus_overall():
    history = {
        "dead_frac/layers.0": [0.0, 0.1, 0.2],
        "dead_frac/layers.10": [0.0, float("nan"), 0.3],
        "dead_frac/layers.2": [0.0, 0.0],
        "dead_frac": [0.0, 0.05, 0.25],
        "dead_frac_other": [1.0],  # neither the prefix's groups nor its overall key
        "dormant_frac/layers.0": [0.5, 0.5, 0.5],
    }
    figure = covariate_figure(history, "dead_frac", "Dead units")
    lines = figure.axes[0].get_lines()
    assert len(lines) == 4
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == [
        "layers.0", "layers.2", "layers.10", "overall"]
    assert lines[-1].get_linewidth() > lines[0].get_linewidth()
    assert list(lines[0].get_xdata()) == [1, 2, 3] and list(lines[1].get_xdata()) == [1, 2]
    assert np.isnan(lines[2].get_ydata()[1])  # NaN kept: drawn as a gap
    close(figure)
    ranks = covariate_figure({"effective_rank/a": [1.0], "effective_rank_mean": [1.0]}, "effective_rank", "r")
    assert len(ranks.axes[0].get_lines()) == 2  # the overall of the rank families is `<prefix>_mean`
    close(ranks)
    prefixes = [prefix for prefix, _ in COVARIATE_PLOTS]
    assert {*(f"covariates/{name}" for name in ("dead_frac", "dormant_frac", "low_activity_frac", "effective_rank",
                                                "stable_rank", "attn_entropy_mean", "weight_mean_abs",
                                                "age_steps_mean", "age_tokens_mean")),
            "plasticity/resets"} == set(prefixes)  # the keys the task loop logs them under


def test_age_histogram_returns_a_figure_with_one_histogram_per_group():
    ages = {"blocks.0.mlp": torch.tensor([0, 1, 5, 100, 3000]), "blocks.1.mlp": np.array([2.0, 2.0, 7.0])}
    figure = age_histogram(ages, "tokens", "Neuron ages")
    axes = figure.axes[0]
    assert len(axes.patches) == 2  # one step histogram per group
    assert axes.get_xscale() == "log"
    close(figure)


def test_gradient_norm_by_hand_in_eval_mode_in_any_batching():
    from continual.covariates import gradient_norm

    net = make_mlp("16,16")
    images, labels = torch.randn(50, 1, 8, 8), torch.arange(50) % 10
    net.train()
    params = list(net.parameters())
    net.eval()
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(net(images), labels), params)
    expected = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads))
    net.train()
    for p in params:
        p.grad = None
    assert gradient_norm(net, images, labels, batch_size=7) == pytest.approx(expected, rel=1e-5)
    assert net.training and all(p.grad is None for p in params)  # mode restored, .grad untouched


def test_distance_from_init_by_hand():
    from continual.covariates import distance_from_init

    net = make_mlp("4")
    initial = [p.detach().clone() for p in net.parameters()]
    assert distance_from_init(net, initial)["distance_from_init"] == 0
    with torch.no_grad():
        first = next(net.parameters())
        first[0, :3] += torch.tensor([3.0, 0.0, 4.0])  # moves θ by a vector of norm 5
    result = distance_from_init(net, initial)
    norm0 = math.sqrt(sum(p.double().pow(2).sum().item() for p in initial))
    assert result["distance_from_init"] == pytest.approx(5.0)
    assert result["distance_from_init_rel"] == pytest.approx(5.0 / norm0)


def test_a_run_logs_the_distance_from_its_initial_parameters_across_a_resume(tmp_path):
    from continual.args import parse_args
    from continual.run import run
    from utils.mlflow_logger import RecordingLogger

    argv = ["--model", "sgd", "--lr", "0.1", "--n_epochs", "1", "--n_tasks", "2", "--covariates", "--seed", "3",
            "--non_verbose", "1", "--no_figures", "--checkpoint_dir", str(tmp_path), "--savecheck", "task"]
    logger = RecordingLogger("whole")
    run(parse_args(argv), logger=logger)
    values = {(k, s): v for k, v, _, s in logger.record["metrics"]}
    assert values["covariates/distance_from_init", 1] > 0 and values["covariates/distance_from_init", 2] > 0
    assert values["covariates/grad_norm", 2] > 0
    checkpoint = next(tmp_path.glob("*_task1.pt"))
    resumed = RecordingLogger("resumed")
    run(parse_args([*argv, "--resume", str(checkpoint)]), logger=resumed)
    again = {(k, s): v for k, v, _, s in resumed.record["metrics"]}
    assert again["covariates/distance_from_init", 2] == values["covariates/distance_from_init", 2]
