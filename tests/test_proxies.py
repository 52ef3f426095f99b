"""Single-run memorization proxies against hand-worked values, and their agreement measures."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from memorization import proxies
from memorization.proxies import (
    agreement,
    agreement_table,
    auroc_of,
    bootstrap_correlations,
    cumulative_loss,
    learned_iteration,
    learned_late,
    pooled,
    top_overlap,
)

# Four records, six examples: always right; learned at the 3rd record; right, forgotten, relearned at the 3rd;
# never right; right until wrong at the last record; flipping, right for good from the 4th.
CORRECT = np.array([[1, 0, 1, 0, 1, 0],
                    [1, 0, 0, 0, 1, 1],
                    [1, 1, 1, 0, 1, 0],
                    [1, 1, 1, 0, 0, 1]])


def test_learned_late_is_the_first_record_of_the_final_run_of_correct_ones():
    np.testing.assert_array_equal(learned_late(CORRECT), [1, 3, 3, 5, 5, 4])
    np.testing.assert_array_equal(learned_late(CORRECT.astype(bool)), [1, 3, 3, 5, 5, 4])


def test_learned_late_in_epoch_numbers_puts_never_learned_one_past_the_last_epoch():
    np.testing.assert_array_equal(learned_late(CORRECT, epochs=[2, 4, 6, 8]), [2, 6, 6, 9, 9, 8])
    with pytest.raises(ValueError, match="increasing"):
        learned_late(CORRECT, epochs=[2, 4, 6])


def test_learned_late_is_nan_for_an_example_the_model_did_not_see():
    record = CORRECT.astype(np.float64)
    record[:, 1] = np.nan
    record[2, 4] = np.nan  # one missing record makes the column undefined too
    np.testing.assert_array_equal(learned_late(record), [1, np.nan, 3, 5, np.nan, 4])


def test_cumulative_loss_sums_the_clipped_label_cross_entropy():
    prob = np.array([[0.5, 1.0, 0.0, np.nan],
                     [0.25, 1.0, 0.5, 0.5]])
    expected = [3 * math.log(2), 0.0, -math.log(1e-7) + math.log(2), np.nan]
    np.testing.assert_allclose(cumulative_loss(prob), expected, rtol=1e-12)
    assert cumulative_loss(prob, eps=1e-3)[2] == pytest.approx(-math.log(1e-3) + math.log(2))


def test_learned_iteration_maps_not_learned_to_nan():
    np.testing.assert_array_equal(learned_iteration(np.array([3, -1, 0, 7])), [3.0, np.nan, 0.0, 7.0])


def test_pooled_averages_over_the_models_that_trained_on_each_example():
    values = np.array([[1.0, 2.0, 3.0, 4.0],
                       [3.0, np.nan, 5.0, 8.0],
                       [9.0, 4.0, 7.0, 2.0]])
    included = np.array([[True, True, False, True],
                         [True, True, False, False],
                         [False, True, False, True]])
    # Example 1: the NaN of a model that trained on it is left out; example 2: no model trained on it.
    np.testing.assert_array_equal(pooled(values, included), [2.0, 3.0, np.nan, 3.0])


def test_a_perfectly_monotone_proxy_has_spearman_one_and_reversed_minus_one():
    reference = np.random.default_rng(0).normal(size=200)
    same = agreement(reference**3, reference, n_boot=200)
    assert same["n"] == 200 and same["spearman"] == pytest.approx(1.0)
    assert same["spearman_lo"] == pytest.approx(1.0) and same["spearman_hi"] == pytest.approx(1.0)
    assert same["pearson"] < 0.95  # cubing bends the line
    assert same["pearson_lo"] <= same["pearson"] <= same["pearson_hi"]
    reversed_ = agreement(-reference, reference, n_boot=200)
    assert reversed_["spearman"] == pytest.approx(-1.0) and reversed_["pearson"] == pytest.approx(-1.0)
    assert reversed_["spearman_hi"] == pytest.approx(-1.0)
    assert same["top_1pct"] == same["top_5pct"] == same["top_10pct"] == 1.0
    assert reversed_["top_10pct"] == 0.0


def test_agreement_uses_only_examples_where_both_are_finite():
    rng = np.random.default_rng(1)
    proxy, reference = rng.normal(size=50), rng.normal(size=50)
    proxy[:5], reference[45:] = np.nan, np.inf
    got = agreement(proxy, reference, n_boot=10)
    assert got["n"] == 40
    assert got["spearman"] == pytest.approx(spearmanr(proxy[5:45], reference[5:45]).statistic)
    assert got["pearson"] == pytest.approx(pearsonr(proxy[5:45], reference[5:45]).statistic)


def test_top_overlap_by_hand():
    reference = np.arange(20.0)  # top-2 {19, 18}; top-5 {15..19}
    proxy = np.arange(20.0) / 100
    proxy[[19, 0, 18, 1, 2]] = [100, 99, 98, 97, 96]  # top-2 {19, 0}; top-5 {19, 0, 18, 1, 2}
    assert top_overlap(proxy, reference, 0.1) == 0.5
    assert top_overlap(proxy, reference, 0.25) == 0.4
    assert top_overlap(proxy, reference, 0.001) == 1.0  # k is at least 1: {19} both
    got = agreement(proxy, reference, top_fractions=(0.1, 0.25), n_boot=10)
    assert got["top_10pct"] == 0.5 and got["top_25pct"] == 0.4


def test_auroc_by_hand_drops_nan_and_is_nan_without_both_classes():
    values = np.array([0.1, 0.4, 0.35, 0.8, np.nan])
    positives = np.array([False, False, True, True, True])
    assert auroc_of(values, positives) == pytest.approx(0.75)  # 3 of the 4 (positive, negative) pairs in order
    assert math.isnan(auroc_of(values, np.array([True, True, True, True, False])))
    got = agreement(values, np.arange(5.0), relabeled=positives, singleton=~positives, n_boot=10)
    assert got["auroc_relabeled"] == pytest.approx(0.75) and got["auroc_singleton"] == pytest.approx(0.25)
    assert "auroc_relabeled" not in agreement(values, np.arange(5.0), n_boot=10)


def test_the_bootstrap_scores_each_resample_as_scipy_scores_it(monkeypatch):
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 6, 30).astype(float), rng.normal(size=30).round(1)  # ties on both sides
    monkeypatch.setattr(proxies, "BOOT_ENTRIES", 64)  # chunks of two resamples
    got = bootstrap_correlations(x, y, n_boot=40, seed=5)
    draws = np.random.default_rng(5).integers(0, 30, (40, 30))
    for r, drawn in enumerate(draws):
        assert got["spearman"][r] == pytest.approx(spearmanr(x[drawn], y[drawn]).statistic, abs=1e-12)
        assert got["pearson"][r] == pytest.approx(pearsonr(x[drawn], y[drawn]).statistic, abs=1e-12)


def test_a_resample_of_one_repeated_pair_is_nan():
    got = bootstrap_correlations(np.array([1.0, 2.0]), np.array([3.0, 1.0]), n_boot=200, seed=0)
    draws = np.random.default_rng(0).integers(0, 2, (200, 2))
    single = draws[:, 0] == draws[:, 1]
    assert single.any() and np.isnan(got["spearman"][single]).all() and np.isnan(got["pearson"][single]).all()
    np.testing.assert_array_equal(got["spearman"][~single], -1.0)


def test_the_bootstrap_interval_repeats_with_the_seed_and_holds_the_estimate():
    rng = np.random.default_rng(3)
    reference = rng.normal(size=300)
    proxy = reference + rng.normal(size=300)
    first, again = agreement(proxy, reference, seed=7), agreement(proxy, reference, seed=7)
    other = agreement(proxy, reference, seed=8)
    for name in ("spearman", "pearson"):
        assert first[f"{name}_lo"] == again[f"{name}_lo"] and first[f"{name}_hi"] == again[f"{name}_hi"]
        assert first[f"{name}_lo"] != other[f"{name}_lo"]
        assert first[f"{name}_lo"] < first[name] < first[f"{name}_hi"]
        assert first[f"{name}_hi"] - first[f"{name}_lo"] < 0.2  # about 4 standard errors of 0.04


def test_agreement_table_holds_the_numbers():
    rng = np.random.default_rng(4)
    reference = rng.normal(size=100)
    relabeled = np.zeros(100, bool)
    relabeled[:10] = True
    row = {"name": "learned_late", "seconds": 1.25,
           **agreement(reference + rng.normal(size=100), reference, relabeled=relabeled, n_boot=50)}
    bare = {"name": "cumulative_loss", "seconds": 0.5, **agreement(-reference, reference, n_boot=50)}
    table = agreement_table([row, bare])
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| proxy | cost (s) | n | Spearman [95% CI] | Pearson [95% CI] | top-1% overlap")
    assert (f"| learned_late | 1.25 | 100 | {row['spearman']:.3f} [{row['spearman_lo']:.3f}, "
            f"{row['spearman_hi']:.3f}] | {row['pearson']:.3f} [") in lines[2]
    assert lines[2].endswith(f"| {row['top_10pct']:.3f} | {row['auroc_relabeled']:.3f} | — |")
    assert lines[3].startswith("| cumulative_loss | 0.50 | 100 | -1.000 [-1.000, -1.000] |")
    assert lines[3].endswith("| 0.000 | — | — |")
