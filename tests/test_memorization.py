"""The held-out memorization estimator gives the scores one derives by hand, undefined ones as NaN."""
import numpy as np
import pytest

from memorization.estimator import auroc, consistency_scores, descending_stable_order, influence, memorization

# A hand-made store: 6 models, 3 training and 3 test examples (rows are models).
MASK = np.array([  # train example 0 is in every model: its scores are undefined
    [1, 1, 1],
    [1, 1, 0],
    [1, 1, 1],
    [1, 0, 0],
    [1, 0, 1],
    [1, 0, 0],
], bool)
TARGET = np.array([  # 0/1 correctness of each model on each training example
    [1, 1, 1],
    [0, 1, 0],
    [1, 0, 1],
    [1, 0, 0],
    [1, 1, 1],
    [1, 0, 1],
], np.float32)
TEST_TARGET = np.array([  # test 0 is right exactly when train 1 was in, test 1 when train 2 was in
    [1, 1, 0],
    [1, 0, 1],
    [1, 1, 0],
    [0, 0, 1],
    [0, 1, 0],
    [0, 0, 1],
], np.float32)
# Influence by hand, mean over models with i minus mean over models without i (models 0-2 hold train 1,
# models 0, 2, 4 hold train 2):
#   train 1: test 0: 3/3 - 0/3 = 1;    test 1: 2/3 - 1/3 = 1/3;  test 2: 1/3 - 2/3 = -1/3
#   train 2: test 0: 2/3 - 1/3 = 1/3;  test 1: 3/3 - 0/3 = 1;    test 2: 0/3 - 3/3 = -1
HAND_INFLUENCE = np.array([[np.nan, np.nan, np.nan], [1, 1 / 3, -1 / 3], [1 / 3, 1, -1]], np.float32)


def test_hand_made_memorization_counts_and_standard_errors():
    scores = memorization(MASK, TARGET)
    np.testing.assert_array_equal(scores["n_in"], [6, 3, 3])
    np.testing.assert_array_equal(scores["n_out"], [0, 3, 3])
    # train 0 was never left out: undefined, reported as NaN and counted, not as 0
    assert np.isnan(scores["mem"][0]) and np.isnan(scores["se"][0]) and np.isnan(scores["mean_out"][0])
    assert scores["n_undefined"] == 1
    assert scores["mean_in"][0] == pytest.approx(5 / 6)
    # train 1: in models 0-2 -> 1, 1, 0 (p_in 2/3); out models 3-5 -> 0, 1, 0 (p_out 1/3)
    # train 2: in models 0, 2, 4 -> 1, 1, 1 (p_in 1);  out models 1, 3, 5 -> 0, 0, 1 (p_out 1/3)
    np.testing.assert_allclose(scores["mem"][1:], [2 / 3 - 1 / 3, 1 - 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(scores["mean_in"][1:], [2 / 3, 1], rtol=1e-6)
    np.testing.assert_allclose(scores["mean_out"][1:], [1 / 3, 1 / 3], rtol=1e-6)
    # SE = sqrt(p_in(1-p_in)/n_in + p_out(1-p_out)/n_out): train 1 sqrt(2/27 + 2/27) = 0.38490018,
    # train 2 sqrt(0/3 + 2/27) = 0.27216553
    np.testing.assert_allclose(scores["se"][1:], [0.38490018, 0.27216553], rtol=1e-6)
    assert scores["mem"].dtype == np.float32 and scores["n_in"].dtype == np.int32


def test_hand_made_influence_topk_pairs_and_histogram():
    result = influence(MASK, TEST_TARGET, topk=3, threshold=0.15)
    assert result["n_undefined_train"] == 1
    # per test example, training examples by influence descending; only two are defined, so the
    # third slot is empty (-1, NaN) rather than the undefined train 0
    np.testing.assert_array_equal(result["topk_index"], [[1, 2, -1], [2, 1, -1], [1, 2, -1]])
    np.testing.assert_allclose(result["topk_value"], [[1, 1 / 3, np.nan], [1, 1 / 3, np.nan],
                                                      [-1 / 3, -1, np.nan]], rtol=1e-6)
    # pairs above 0.15, value descending, ties by train index: exactly these four
    pairs = list(zip(result["pair_train"].tolist(), result["pair_test"].tolist()))
    assert pairs == [(1, 0), (2, 1), (1, 1), (2, 0)]
    np.testing.assert_allclose(result["pair_value"], [1, 1, 1 / 3, 1 / 3], rtol=1e-6)
    # bins of width 0.025 on [-1, 1]: -1 -> bin 0, -1/3 -> 26, 1/3 -> 53, 1 -> 79 (last bin is closed)
    expected = np.zeros(80, np.int64)
    expected[[0, 26, 53, 79]] = [1, 1, 2, 2]
    np.testing.assert_array_equal(result["histogram"], expected)


def test_block_size_does_not_change_results_and_full_matrix_is_memory_mapped(tmp_path):
    rng = np.random.default_rng(1)
    mask = rng.random((50, 40)) < 0.6
    mask[:, 7] = True  # never left out
    test_target = (rng.random((50, 25)) < 0.5).astype(np.float32)
    one = influence(mask, test_target, topk=4, threshold=0.2, block_rows=1, full_path=tmp_path / "a.npy")
    big = influence(mask, test_target, topk=4, threshold=0.2, block_rows=10_000, full_path=tmp_path / "b.npy")
    some = influence(mask, test_target, topk=4, threshold=0.2, block_rows=17)
    for key in ("topk_index", "topk_value", "pair_train", "pair_test", "pair_value", "histogram"):
        np.testing.assert_array_equal(one[key], big[key])
        np.testing.assert_array_equal(one[key], some[key])
    full = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert isinstance(full, np.memmap) and full.dtype == np.float32 and full.shape == (40, 25)
    np.testing.assert_array_equal(full, np.load(tmp_path / "b.npy"))
    np.testing.assert_array_equal(full, brute_influence(mask, test_target))


def test_hand_made_full_matrix(tmp_path):
    influence(MASK, TEST_TARGET, full_path=tmp_path / "full.npy")
    np.testing.assert_allclose(np.load(tmp_path / "full.npy", mmap_mode="r"), HAND_INFLUENCE, rtol=1e-6)


def test_consistency_score_averages_held_out_accuracy_over_ratios():
    ratio = np.array([0.5, 0.5, 0.9, 0.9])
    mask = np.array([[1, 0, 1], [0, 0, 1], [0, 1, 1], [1, 1, 1]], bool)
    target = np.array([[1, 1, 1], [0, 1, 1], [1, 0, 1], [0, 0, 1]], np.float32)
    # train 0: ratio .5 left out by model 1 -> 0; ratio .9 left out by model 2 -> 1; C-score 0.5
    # train 1: ratio .5 left out by models 0, 1 -> 1; ratio .9 never left out -> NaN; C-score 1
    # train 2: never left out at any ratio -> NaN everywhere
    scores = consistency_scores(mask, target, ratio)
    assert sorted(scores["per_ratio"]) == [0.5, 0.9]
    np.testing.assert_array_equal(scores["per_ratio"][0.5], [0, 1, np.nan])
    np.testing.assert_array_equal(scores["per_ratio"][0.9], [1, np.nan, np.nan])
    np.testing.assert_array_equal(scores["cscore"], [0.5, 1, np.nan])


# -- against a straightforward loop -------------------------------------------------------------------
def held_out_difference(included: np.ndarray, values: np.ndarray) -> np.float32:
    """Mean of values where included minus where not, in float32 as the estimator does; NaN if one is empty."""
    if included.all() or not included.any():
        return np.float32(np.nan)
    mean_in = np.float32(values[included].sum(dtype=np.float64)) / np.float32(included.sum())
    mean_out = np.float32(values[~included].sum(dtype=np.float64)) / np.float32((~included).sum())
    return mean_in - mean_out


def brute_influence(mask: np.ndarray, test_target: np.ndarray) -> np.ndarray:
    n, m = mask.shape[1], test_target.shape[1]
    return np.array([[held_out_difference(mask[:, i], test_target[:, j]) for j in range(m)]
                     for i in range(n)], np.float32)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("block_rows", [7, 1000])  # 1000: the first block is cut to its own top-k first
def test_random_store_matches_a_loop(binary, block_rows):
    rng = np.random.default_rng(0)
    n_models, n, m, k = 40, 30, 20, 5
    mask = rng.random((n_models, n)) < 0.7
    mask[:, 3], mask[:, 11] = True, False  # one never left out, one never included
    target = rng.random((n_models, n)).astype(np.float32)
    test_target = rng.random((n_models, m)).astype(np.float32)
    if binary:
        target, test_target = (target < 0.6).astype(np.float32), (test_target < 0.6).astype(np.float32)

    scores = memorization(mask, target)
    expected_mem = [held_out_difference(mask[:, i], target[:, i]) for i in range(n)]
    expected_se = [np.sqrt(target[mask[:, i], i].var(dtype=np.float64) / mask[:, i].sum()
                           + target[~mask[:, i], i].var(dtype=np.float64) / (~mask[:, i]).sum())
                   if 0 < mask[:, i].sum() < n_models else np.nan for i in range(n)]
    np.testing.assert_allclose(scores["mem"], expected_mem, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores["se"], expected_se, rtol=1e-5, atol=1e-6)
    assert scores["n_undefined"] == 2

    dense = brute_influence(mask, test_target)
    result = influence(mask, test_target, topk=k, threshold=0.15, block_rows=block_rows)
    for j in range(m):  # value descending, ties to the lower train index, undefined rows skipped
        defined = np.flatnonzero(np.isfinite(dense[:, j]))
        order = defined[np.lexsort((defined, -dense[defined, j]))][:k]
        np.testing.assert_allclose(result["topk_value"][j], dense[order, j], rtol=1e-5, atol=1e-6)
        if binary:  # 0/1 sums are exact, so ties are ties in both and the indices must agree
            np.testing.assert_array_equal(result["topk_index"][j], order)
    hits = np.argwhere(dense > 0.15)
    if binary:
        assert set(zip(result["pair_train"], result["pair_test"])) == set(map(tuple, hits))
        finite = dense[np.isfinite(dense)]
        np.testing.assert_array_equal(result["histogram"], np.histogram(finite, np.linspace(-1, 1, 81))[0])
    assert np.all(np.diff(result["pair_value"]) <= 0)


def test_histogram_matches_numpy_on_bin_edges_and_outside_the_range():
    rng = np.random.default_rng(2)
    # test targets outside [0, 1] give influences beyond the bins; multiples of 1/40 sit on edges
    n_models = 80
    mask = np.zeros((n_models, 12), bool)
    mask[: n_models // 2] = True
    mask[:, 6:] = rng.random((n_models, 6)) < 0.5
    test_target = rng.integers(-2, 4, (n_models, 30)).astype(np.float32)
    result = influence(mask, test_target, bins=np.linspace(-1, 1, 81))
    dense = brute_influence(mask, test_target)
    np.testing.assert_array_equal(result["histogram"],
                                  np.histogram(dense[np.isfinite(dense)], np.linspace(-1, 1, 81))[0])
    uneven = np.array([-1, -0.5, 0, 0.1, 1.0])
    np.testing.assert_array_equal(influence(mask, test_target, bins=uneven)["histogram"],
                                  np.histogram(dense[np.isfinite(dense)], uneven)[0])


def test_planted_memorized_examples_score_one_and_rank_first():
    rng = np.random.default_rng(3)
    n_models, n = 200, 100
    mask = rng.random((n_models, n)) < 0.7
    memorized = np.zeros(n, bool)
    memorized[rng.choice(n, 10, replace=False)] = True
    # memorized examples are right only when trained on; the others are always right
    target = np.where(memorized, mask, True).astype(np.float32)
    scores = memorization(mask, target)
    np.testing.assert_array_equal(scores["mem"], memorized.astype(np.float32))
    np.testing.assert_array_equal(scores["se"], 0)
    assert auroc(scores["mem"], memorized) == 1.0
    # an undefined score is left out of the AUROC rather than counted as 0
    with_nan = scores["mem"].copy()
    with_nan[np.flatnonzero(~memorized)[0]] = np.nan
    assert auroc(with_nan, memorized) == 1.0


# -- the compiled passes against a straightforward numpy reference -----------------------------------
def reference_passes(dense: np.ndarray, k: int, threshold, bins: np.ndarray) -> dict:
    """Top-k, pairs and histogram of a dense [n, m] influence matrix by sorting; NaN entries skipped."""
    n, m = dense.shape
    topk_index, topk_value = np.full((m, k), -1, np.int32), np.full((m, k), np.nan, np.float32)
    for j in range(m):  # value descending, ties to the lower train index
        rows = np.flatnonzero(~np.isnan(dense[:, j]) & (dense[:, j] > -np.inf))
        best = rows[np.lexsort((rows, -dense[rows, j]))][:k]
        topk_index[j, :best.size], topk_value[j, :best.size] = best, dense[best, j]
    train, test = np.nonzero(dense > threshold)  # numpy's own float32-against-threshold comparison
    value = dense[train, test]
    order = np.lexsort((test, train, -value))
    return {"topk_index": topk_index, "topk_value": topk_value, "pair_train": train[order].astype(np.int32),
            "pair_test": test[order].astype(np.int32), "pair_value": value[order],
            "histogram": np.histogram(dense[~np.isnan(dense)], bins)[0]}


def assert_same_passes(result: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert result[key].dtype == value.dtype, key
        np.testing.assert_array_equal(result[key], value, err_msg=key)


def quantised_store(seed: int, n_models: int = 12, n: int = 30, m: int = 20):
    """Few models and targets in {0, 0.5, 1}: many influences are equal, and some equal 0.25 exactly."""
    rng = np.random.default_rng(seed)
    mask = rng.random((n_models, n)) < 0.6
    mask[:, 3], mask[:, 11] = True, False  # never left out, never included: undefined rows
    test_target = rng.integers(0, 3, (n_models, m)).astype(np.float32) / 2
    return mask, test_target


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("block_rows", [1, 7, 4096])
@pytest.mark.parametrize("k", [1, 5, 50])  # 50: more than the 28 defined training examples
def test_influence_passes_match_a_sorting_reference_with_ties(seed, block_rows, k):
    mask, test_target = quantised_store(seed)
    dense = brute_influence(mask, test_target)
    assert np.isin(np.float32(0.25), dense)  # a pair exactly at the threshold is not above it
    bins = np.linspace(-1, 1, 81)
    result = influence(mask, test_target, topk=k, threshold=0.25, block_rows=block_rows, bins=bins)
    assert_same_passes(result, reference_passes(dense, k, 0.25, bins))
    if k == 50:
        assert (result["topk_index"][:, 28:] == -1).all() and np.isnan(result["topk_value"][:, 28:]).all()


def test_influence_passes_on_continuous_targets_and_uneven_bins(tmp_path):
    rng = np.random.default_rng(4)
    mask = rng.random((40, 300)) < 0.7
    test_target = rng.random((40, 50)).astype(np.float32)
    bins = np.array([-1, -0.3, -0.05, 0, 0.02, 0.1, 0.5, 1.0])
    result = influence(mask, test_target, topk=7, threshold=0.1, block_rows=64, bins=bins,
                       full_path=tmp_path / "full.npy")
    dense = np.load(tmp_path / "full.npy")  # float32 sums are not exact here: the estimator's own matrix
    np.testing.assert_allclose(dense, brute_influence(mask, test_target), rtol=1e-5, atol=1e-6)
    assert_same_passes(result, reference_passes(dense, 7, 0.1, bins))


def test_no_pair_above_the_threshold_and_every_row_undefined():
    mask, test_target = quantised_store(2)
    result = influence(mask, test_target, topk=3, threshold=2.0, block_rows=7)
    assert result["pair_train"].size == result["pair_test"].size == result["pair_value"].size == 0
    assert (result["pair_train"].dtype, result["pair_value"].dtype) == (np.int32, np.float32)
    everything_in = influence(np.ones_like(mask), test_target, topk=3, block_rows=7)
    assert everything_in["n_undefined_train"] == mask.shape[1]
    assert (everything_in["topk_index"] == -1).all() and np.isnan(everything_in["topk_value"]).all()
    assert everything_in["pair_value"].size == 0 and everything_in["histogram"].sum() == 0


def test_nan_test_target_leaves_its_column_out_of_every_pass():
    mask, test_target = quantised_store(3)
    test_target[5, [2, 9]] = np.nan  # NaN in one model's target makes the whole influence column NaN
    dense = brute_influence(mask, test_target)
    assert np.isnan(dense[:, [2, 9]]).all()
    bins = np.linspace(-1, 1, 81)
    result = influence(mask, test_target, topk=4, threshold=0.25, block_rows=7, bins=bins)
    assert_same_passes(result, reference_passes(dense, 4, 0.25, bins))
    assert (result["topk_index"][[2, 9]] == -1).all() and not np.isin(result["pair_test"], [2, 9]).any()


def test_threshold_is_compared_as_numpy_compares_float32_values():
    # one training example, in model 0 only: its influence on the test example is exactly float32(0.15)
    mask, test_target = np.array([[True], [False]]), np.array([[0.15], [0.0]], np.float32)
    assert influence(mask, test_target, threshold=0.15)["pair_value"].size == 0  # float32(0.15) > float32(0.15)
    wide = influence(mask, test_target, threshold=np.float64(0.15))  # compared in float64, as numpy does
    np.testing.assert_array_equal(wide["pair_value"], [np.float32(0.15)])


def test_bin_counts_match_numpy_histogram_on_edges_infinities_and_nan():
    from memorization.estimator import _bin_starts, _count_bins

    rng = np.random.default_rng(5)
    # even edges (the guess is kept away from them), edges 1e-4 apart far from 0, uneven edges (always
    # looked up), an empty bin, and edges that float32 cannot hold
    for bins in (np.linspace(-1, 1, 81), np.linspace(-0.3, 0.7, 7), np.linspace(1000, 1000.001, 11),
                 np.array([-1, -0.5, -0.5, 0, 0.1, 1.0]), np.array([0.1, 0.1 + 1e-9, 0.2])):
        on_edges = bins.astype(np.float32)
        near = np.concatenate([on_edges, np.nextafter(on_edges, np.float32(-np.inf)),
                               np.nextafter(on_edges, np.float32(np.inf))])
        spread = rng.uniform(bins[0] - (bins[-1] - bins[0]) / 4, bins[-1] + (bins[-1] - bins[0]) / 4, 2000)
        values = np.concatenate([near, spread.astype(np.float32), rng.uniform(-1.5, 1.5, 500).astype(np.float32),
                                 np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 3e38, -3e38], np.float32)])
        values = rng.permutation(values).astype(np.float32)
        starts, lo, scale, tol = _bin_starts(bins)
        counts = np.zeros(len(starts) - 1, np.int64)  # below the range, the bins, above it
        for part in np.array_split(values, 3):  # counts accumulate
            _count_bins(part, starts, lo, scale, tol, counts, np.empty(part.size, np.int32))
        finite = values[~np.isnan(values)]
        np.testing.assert_array_equal(counts[1:-1], np.histogram(finite, bins)[0], err_msg=str(bins))
        assert counts[0] == np.sum(finite < bins[0]) and counts[-1] == np.sum(finite > bins[-1])
    for bad in (np.array([0.0, 1.0, 0.5]), np.array([0.0, np.inf]), np.array([0.5, 0.5])):
        with pytest.raises(ValueError):
            _bin_starts(bad)


def test_topk_of_parts_over_blocks_matches_sorting_with_ties_and_infinities():
    from memorization.estimator import _merge_topk, _update_topk

    rng = np.random.default_rng(6)
    values = rng.integers(-3, 4, (200, 37)).astype(np.float32) / 4  # many ties
    values[rng.random(values.shape) < 0.05] = np.nan
    values[rng.random(values.shape) < 0.02] = np.inf
    values[rng.random(values.shape) < 0.02] = -np.inf
    values[:, 5] = np.nan  # a column with nothing defined
    for k in (1, 4, 250):
        n_parts = 3  # as influence splits each block's rows between threads, each with its own lists
        best_value, best_index = np.full((n_parts, 37, k), -np.inf, np.float32), np.full((n_parts, 37, k), -1, np.int32)
        kth = best_value[:, :, -1].copy()
        for start, stop in ((0, 1), (1, 60), (60, 61), (61, 200)):
            for part, rows in enumerate(np.array_split(np.arange(start, stop), n_parts)):
                for i in rows:
                    _update_topk(values[i], i, kth[part], best_value[part], best_index[part])
        np.testing.assert_array_equal(kth, best_value[:, :, -1])
        value, index = _merge_topk(best_value, best_index)
        value[index < 0] = np.nan
        expected = reference_passes(values, k, 0.0, np.linspace(-1, 1, 3))
        np.testing.assert_array_equal(index, expected["topk_index"])
        np.testing.assert_array_equal(value, expected["topk_value"])


def test_pairs_above_are_in_row_major_order_as_nonzero_gives():
    from memorization.estimator import _count_above, _pairs_above

    rng = np.random.default_rng(7)
    values = rng.integers(-2, 5, (50, 33)).astype(np.float32) / 8
    values[rng.random(values.shape) < 0.05] = np.nan
    values[10] = np.float32(0.15)
    for threshold in (np.float32(0.15), np.float64(0.15), np.float32(0.25), np.float32(9)):
        n_above = np.array([_count_above(row, threshold) for row in values])
        np.testing.assert_array_equal(n_above, (values > threshold).sum(1))
        train, test, value = _pairs_above(values, threshold, 100, n_above)
        rows, cols = np.nonzero(values > threshold)
        np.testing.assert_array_equal(train, rows + 100)
        np.testing.assert_array_equal(test, cols)
        np.testing.assert_array_equal(value, values[rows, cols])
        assert (train.dtype, test.dtype, value.dtype) == (np.int32, np.int32, np.float32)


def test_bin_counts_match_numpy_histogram_next_to_random_evenly_spaced_edges():
    from memorization.estimator import _bin_starts, _count_bins

    rng = np.random.default_rng(8)
    for _ in range(200):  # offsets and widths over several decades; values within 3 ulps of every edge
        n_bins, lo, width = int(rng.integers(1, 200)), rng.normal() * 10 ** rng.uniform(-3, 3), 10 ** rng.uniform(-4, 2)
        bins = np.linspace(lo, lo + n_bins * width, n_bins + 1)
        up = down = bins.astype(np.float32)
        near = [up]
        for _ in range(3):
            up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
            near += [up, down]
        values = np.concatenate([*near, rng.uniform(bins[0] - n_bins * width, bins[-1] + n_bins * width, 500)])
        values = values.astype(np.float32)
        starts, lo32, scale, tol = _bin_starts(bins)
        counts = np.zeros(len(starts) - 1, np.int64)
        _count_bins(values, starts, lo32, scale, tol, counts, np.empty(values.size, np.int32))
        np.testing.assert_array_equal(counts[1:-1], np.histogram(values, bins)[0])


def test_the_pairs_order_is_numpys_stable_descending_sort_with_ties_signs_zeros_and_infinities():
    rng = np.random.default_rng(3)
    special = np.array([-1.5, -0.0, 0.0, 0.15, 0.2, 1e-30, -1e-30, np.inf, -np.inf, 1.4e-45, -1.4e-45], np.float32)
    for trial in range(60):
        values = (rng.choice(special, rng.integers(0, 200)) if trial % 2
                  else rng.normal(size=rng.integers(0, 200)).astype(np.float32))
        np.testing.assert_array_equal(descending_stable_order(values), np.argsort(-values, kind="stable"))
