"""The linear datamodeling score and the leave-one-out correlation, against scipy and planted attributions."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from memorization import lds
from memorization.lds import linear_datamodeling_score, loo_correlation


def planted(n_models: int, n_train: int = 60, n_test: int = 12, noise: float = 0.1, seed: int = 0):
    """Masks of random half subsets and outputs that are truly linear in them: masks @ theta + noise."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(n_train, n_test))
    masks = rng.random((n_models, n_train)) < 0.5
    outputs = masks @ theta + noise * rng.normal(size=(n_models, n_test))
    return theta, masks, outputs


def test_lds_per_test_example_is_scipy_spearman_of_predicted_and_true_outputs():
    rng = np.random.default_rng(1)
    attribution = rng.normal(size=(40, 15))
    masks = rng.random((60, 40)) < 0.5
    outputs = rng.integers(0, 5, size=(60, 15)).astype(float)  # ties, as 0/1 correctness would give
    got = linear_datamodeling_score(attribution, masks, outputs, bias=rng.normal(size=15))
    predicted = masks.astype(float) @ attribution
    direct = [spearmanr(predicted[:, j], outputs[:, j]).statistic for j in range(15)]
    np.testing.assert_allclose(got["per_test"], direct, atol=1e-6)
    assert got["lds"] == pytest.approx(np.mean(direct), abs=1e-6)
    assert got["n_defined"] == 15 and got["n_models"] == 60


def test_a_memory_mapped_attribution_read_in_blocks_gives_the_same_score(tmp_path, monkeypatch):
    theta, masks, outputs = planted(80)
    np.save(tmp_path / "attribution.npy", theta.astype(np.float32))
    whole = linear_datamodeling_score(theta.astype(np.float32), masks, outputs)
    monkeypatch.setattr(lds, "BLOCK_ENTRIES", 100)  # one test column per block
    mapped = linear_datamodeling_score(np.load(tmp_path / "attribution.npy", mmap_mode="r"), masks, outputs)
    np.testing.assert_array_equal(mapped["per_test"], whole["per_test"])


def test_the_true_linear_model_scores_high_and_a_random_one_near_zero():
    theta, masks, outputs = planted(400)
    assert linear_datamodeling_score(theta, masks, outputs)["lds"] > 0.9
    random = np.random.default_rng(9).normal(size=theta.shape)
    assert abs(linear_datamodeling_score(random, masks, outputs)["lds"]) < 0.1


def test_a_constant_column_is_left_out_and_counted():
    theta, masks, outputs = planted(50)
    outputs[:, 3] = 1.0  # every model gives the same output
    theta[:, 7] = 0.0  # the attribution predicts the same for every model
    outputs[5, 9] = np.nan  # a missing output
    got = linear_datamodeling_score(theta, masks, outputs)
    assert np.isnan(got["per_test"][[3, 7, 9]]).all() and got["n_defined"] == 9
    assert got["lds"] == pytest.approx(np.nanmean(got["per_test"]))


def test_shape_mismatches_are_refused_with_the_shapes():
    theta, masks, outputs = planted(20)
    with pytest.raises(ValueError, match=r"masks \(20, 59\)"):
        linear_datamodeling_score(theta, masks[:, 1:], outputs)
    with pytest.raises(ValueError, match=r"outputs \(19, 12\)"):
        linear_datamodeling_score(theta, masks, outputs[1:])
    with pytest.raises(ValueError, match=r"bias \(11,\)"):
        linear_datamodeling_score(theta, masks, outputs, bias=np.zeros(11))
    with pytest.raises(ValueError, match=r"loo_effect \(5, 3\)"):
        loo_correlation(np.zeros((5, 4)), np.zeros((5, 3)))


def test_loo_correlation_matches_scipy_over_the_finite_pairs():
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(30, 8)).round(1)  # ties
    effect = rows + rng.normal(size=(30, 8))
    effect[rng.random((30, 8)) < 0.2] = np.nan
    rows[0, 0] = np.inf
    effect[:2, 5], effect[2:, 5] = (0.5, -0.5), np.nan  # two pairs: below min_pairs
    got = loo_correlation(rows, effect)
    both = np.isfinite(rows) & np.isfinite(effect)
    assert got["n_pairs"] == both.sum() and got["n_examples"] == 30
    assert got["pearson"] == pytest.approx(pearsonr(rows[both], effect[both]).statistic, abs=1e-12)
    assert got["spearman"] == pytest.approx(spearmanr(rows[both], effect[both]).statistic, abs=1e-12)
    for j in range(8):
        keep = both[:, j]
        if j == 5:
            assert keep.sum() == 2 and math.isnan(got["per_test_spearman"][j])
            continue
        assert got["per_test_spearman"][j] == pytest.approx(spearmanr(rows[keep, j], effect[keep, j]).statistic)
        assert got["per_test_pearson"][j] == pytest.approx(pearsonr(rows[keep, j], effect[keep, j]).statistic)
    assert got["n_test_defined"] == 7
    assert got["mean_per_test_spearman"] == pytest.approx(np.nanmean(got["per_test_spearman"]))


def test_loo_correlation_is_high_for_planted_effects_and_near_zero_for_random_ones():
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(200, 50))
    near = loo_correlation(rows, rows + 0.2 * rng.normal(size=rows.shape))
    assert near["pearson"] > 0.9 and near["spearman"] > 0.9 and near["mean_per_test_spearman"] > 0.9
    far = loo_correlation(rows, rng.normal(size=rows.shape))
    assert abs(far["pearson"]) < 0.1 and abs(far["spearman"]) < 0.1 and abs(far["mean_per_test_spearman"]) < 0.1
    constant = loo_correlation(rows, np.ones_like(rows))
    assert math.isnan(constant["spearman"]) and constant["n_test_defined"] == 0
