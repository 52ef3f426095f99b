"""Data attribution scored against retrained models: the linear datamodeling score and leave-one-out correlation.

An attribution tau [n_train, n_test] holds tau[i, j], the estimated effect of training example i on the
output of test example j (an influence matrix, a datamodel's weights, TRAK's scores). Two checks, with the
definitions TRAK and dattri use:

- Linear datamodeling score (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale", ICML, its
  definition of the LDS; dattri.metric.lds, Deng et al. 2024, "dattri: A Library for Efficient Data
  Attribution", NeurIPS Datasets and Benchmarks). Take K models trained on random subsets S_k of the
  training set that were not used to fit tau. The attribution predicts model k's output on test example j
  as the sum of tau[i, j] over i in S_k (plus a bias, which no rank correlation sees). LDS_j is the Spearman
  correlation over the K models of that prediction with the model's actual output on j; the LDS is the mean
  of LDS_j over the test examples.
- Leave-one-out correlation (dattri.metric.loo_corr; Koh & Liang 2017): for L training examples, each with
  a model trained without it, the correlation of tau[i, j] with the measured effect of removing i on j.
"""
from __future__ import annotations

import warnings

import numpy as np

from memorization.estimator import blocks

BLOCK_ENTRIES = 2**25  # attribution entries read per block of test columns (128 MiB in float32)


def _column_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of a with the same column of b (both [rows, columns], no NaN);
    NaN where a column of either is constant."""
    da, db = a - a.mean(0), b - b.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (da * db).sum(0) / np.sqrt((da * da).sum(0) * (db * db).sum(0))
    # A constant column's rounded mean can miss its value, so say NaN from the values, not from 0/0.
    r[(np.ptp(a, 0) == 0) | (np.ptp(b, 0) == 0)] = np.nan
    return np.clip(r, -1.0, 1.0)  # rounding can step just past +-1; NaN stays NaN


def _column_pearson_nan(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """_column_pearson over each column's rows where a and b are both finite (a and b share their NaN)."""
    present = np.isfinite(a)
    count = present.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        da = np.where(present, a - np.where(present, a, 0).sum(0) / count, 0.0)
        db = np.where(present, b - np.where(present, b, 0).sum(0) / count, 0.0)
        r = (da * db).sum(0) / np.sqrt((da * da).sum(0) * (db * db).sum(0))
    for v in (a, b):  # constant over the present rows (or none present)
        r[np.max(v, 0, initial=-np.inf, where=present) == np.min(v, 0, initial=np.inf, where=present)] = np.nan
    return np.clip(r, -1.0, 1.0)


def predicted_outputs(attribution: np.ndarray, masks: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """The attribution's prediction [K, n_test] of each model's outputs: masks [K, n_train] @ attribution,
    plus bias [n_test]. The product goes in blocks of test columns, so a memory-mapped attribution
    (np.load(..., mmap_mode="r")) is read a block at a time; float32 unless the attribution is float64."""
    dtype = np.result_type(attribution.dtype, np.float32)
    weights = np.asarray(masks, bool).astype(dtype)
    n_train, n_test = attribution.shape
    predicted = np.empty((weights.shape[0], n_test), np.float64)
    for cols in blocks(n_test, max(1, BLOCK_ENTRIES // max(n_train, 1))):
        predicted[:, cols] = weights @ np.asarray(attribution[:, cols], dtype)
    if bias is not None:
        predicted += np.asarray(bias, np.float64)
    return predicted


def linear_datamodeling_score(attribution: np.ndarray, masks: np.ndarray, outputs: np.ndarray,
                              bias: np.ndarray | None = None) -> dict:
    """LDS of attribution [n_train, n_test] against K held-out models: masks [K, n_train] bool (model k's
    training subset; models not used to fit the attribution), outputs [K, n_test] (model k's actual output
    on each test example, e.g. its correct-class margin), bias [n_test] optional.

    predicted[k, j] = sum_i masks[k, i] * attribution[i, j] (+ bias[j]); per_test[j] = Spearman over k of
    predicted[:, j] with outputs[:, j] (ranks along the model axis, ties averaged, then Pearson of the ranks:
    scipy.stats.spearmanr's value). NaN where a column is constant on either side or an output is not
    finite; "lds" is the mean over the "n_defined" test examples with a correlation (NaN if none).
    """
    from scipy.stats import rankdata

    if not hasattr(attribution, "shape"):  # a memory map stays one; a nested list becomes an array
        attribution = np.asarray(attribution, np.float64)
    masks, outputs = np.asarray(masks), np.asarray(outputs, np.float64)
    if attribution.ndim != 2 or masks.ndim != 2 or outputs.ndim != 2:
        raise ValueError(f"attribution {attribution.shape}, masks {masks.shape} and outputs {outputs.shape} "
                         f"must be [n_train, n_test], [models, n_train] and [models, n_test]")
    n_train, n_test = attribution.shape
    n_models = masks.shape[0]
    if masks.shape[1] != n_train or outputs.shape != (n_models, n_test):
        raise ValueError(f"attribution {attribution.shape} [n_train, n_test], masks {masks.shape} [models, n_train] "
                         f"and outputs {outputs.shape} [models, n_test] do not fit together")
    if bias is not None and np.shape(bias) != (n_test,):
        raise ValueError(f"bias {np.shape(bias)} must be [n_test] = ({n_test},)")
    predicted = predicted_outputs(attribution, masks, bias)
    per_test = _column_pearson(rankdata(predicted, axis=0), rankdata(np.nan_to_num(outputs), axis=0))
    per_test[~np.isfinite(outputs).all(0)] = np.nan
    defined = np.isfinite(per_test)
    return {"lds": float(per_test[defined].mean()) if defined.any() else float("nan"), "per_test": per_test,
            "n_defined": int(defined.sum()), "n_models": n_models}


def loo_correlation(attribution_rows: np.ndarray, loo_effect: np.ndarray, min_pairs: int = 3) -> dict:
    """How well the attribution rows of L left-out training examples predict their measured effects.

    attribution_rows [L, n_test]: attribution[i, :] for each left-out example i; loo_effect [L, n_test]:
    the full model's output on j minus that of the model trained without i, averaged over seeds (NaN where
    unmeasured). Over all (i, j) pairs where both are finite: "pearson" and "spearman" (scipy; "n_pairs").
    Per test example j, over the left-out examples where both are finite: "per_test_spearman" [n_test] and
    "per_test_pearson" [n_test] (dattri's loo_corr), NaN with fewer than min_pairs pairs or a constant side;
    "mean_per_test_spearman" / "mean_per_test_pearson" average the defined ones ("n_test_defined": how
    many Spearman values are defined).
    """
    from scipy.stats import pearsonr, rankdata

    rows, effect = np.asarray(attribution_rows, np.float64), np.asarray(loo_effect, np.float64)
    if rows.shape != effect.shape or rows.ndim != 2:
        raise ValueError(f"attribution_rows {rows.shape} and loo_effect {effect.shape} must both be [L, n_test]")
    both = np.isfinite(rows) & np.isfinite(effect)
    x, y = rows[both], effect[both]
    out: dict = {"n_pairs": int(both.sum()), "n_examples": rows.shape[0]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input gives NaN with a warning
        out["pearson"] = float(pearsonr(x, y).statistic) if len(x) >= 2 else float("nan")
        # spearmanr's value as the Pearson of the ranks: spearmanr itself took 7 s on 10^7 pairs, this 2 s.
        out["spearman"] = float(pearsonr(rankdata(x), rankdata(y)).statistic) if len(x) >= 2 else float("nan")
    a, b = np.where(both, rows, np.nan), np.where(both, effect, np.nan)
    few = both.sum(0) < max(min_pairs, 2)
    for name, (u, v) in (("spearman", (rankdata(a, axis=0, nan_policy="omit"), rankdata(b, axis=0, nan_policy="omit"))),
                         ("pearson", (a, b))):
        per_test = _column_pearson_nan(u, v)
        per_test[few] = np.nan
        defined = np.isfinite(per_test)
        out[f"per_test_{name}"] = per_test
        out[f"mean_per_test_{name}"] = float(per_test[defined].mean()) if defined.any() else float("nan")
        if name == "spearman":
            out["n_test_defined"] = int(defined.sum())
    return out
