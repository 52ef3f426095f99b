"""Held-out memorization and influence estimates (Feldman & Zhang 2020) and consistency scores.

K models, model k trained on the subset `mask[k]` of the n training examples, each evaluated on all
n training and m test examples. A target is 0/1 correctness or the softmax probability of the label.
Scores of an example that was never left out (or never included) are undefined: NaN, never 0.
Every sum over models is a vectorised numpy reduction or a float32 matrix product. The passes of
`influence` over each block of the [n, m] matrix (its mean arithmetic, histogram, pairs and top-k) are
numba kernels on every core: a numpy pass runs on one thread while BLAS uses them all, and at small K
those passes, not the product, took most of the time.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numba
import numpy as np
from numba import prange


def _blocks(size: int, block: int) -> Iterator[slice]:
    """Consecutive slices of `range(size)`, `block` long (the last may be shorter)."""
    for start in range(0, size, block):
        yield slice(start, min(start + block, size))


def _masked_sums(mask: np.ndarray, target: np.ndarray, block: int = 8192) -> tuple[np.ndarray, ...]:
    """Per column: count, sum and sum of squares of target where mask holds, and over all models."""
    n = mask.shape[1]
    count, total, total_sq, masked, masked_sq = (np.empty(n, np.float32) for _ in range(5))
    for cols in _blocks(n, block):  # column blocks bound the float32 copy of the mask
        chosen, values = mask[:, cols].astype(np.float32), target[:, cols]
        count[cols] = chosen.sum(0)
        masked[cols] = np.einsum("kn,kn->n", chosen, values)  # no [K, b] product materialised
        masked_sq[cols] = np.einsum("kn,kn,kn->n", chosen, values, values)
        total[cols] = values.sum(0)
        total_sq[cols] = np.einsum("kn,kn->n", values, values)
    return count, masked, masked_sq, total, total_sq


def _mean_var(count: np.ndarray, total: np.ndarray, total_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population variance from sums, in float64; NaN where count is 0."""
    count = count.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        var = np.maximum(total_sq / count - mean**2, 0.0)  # rounding can push p - p^2 just below 0
    return mean, var


def memorization(mask: np.ndarray, target: np.ndarray) -> dict:
    """mem_i = mean target of models that trained on i - mean of models that left i out, with its SE."""
    mask = np.asarray(mask, bool)
    n_in, sum_in, sq_in, total, total_sq = _masked_sums(mask, target)
    n_out = mask.shape[0] - n_in
    mean_in, var_in = _mean_var(n_in, sum_in, sq_in)
    mean_out, var_out = _mean_var(n_out, total - sum_in, total_sq - sq_in)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(var_in / n_in + var_out / n_out)
    undefined = (n_in == 0) | (n_out == 0)
    se[undefined] = np.nan  # var/0 would give inf or NaN depending on the other side; say NaN always
    return {
        "mem": (mean_in - mean_out).astype(np.float32), "se": se.astype(np.float32),
        "mean_in": mean_in.astype(np.float32), "mean_out": mean_out.astype(np.float32),
        "n_in": n_in.astype(np.int32), "n_out": n_out.astype(np.int32), "n_undefined": int(undefined.sum()),
    }


@numba.njit(parallel=True, cache=True)
def _held_out_difference(infl: np.ndarray, total: np.ndarray, div_in: np.ndarray, div_out: np.ndarray,
                         undefined: np.ndarray) -> None:
    """In place, row i of the product (sums over the models with train i) becomes the mean with i minus the
    mean without i; NaN for an undefined row. One loop instead of four numpy passes over the block, with
    the same float32 operations in the same order, so the same bits."""
    for i in prange(infl.shape[0]):
        if undefined[i]:
            infl[i] = np.nan
            continue
        for j in range(infl.shape[1]):
            with_i = infl[i, j]
            infl[i, j] = with_i / div_in[i] - (total[j] - with_i) / div_out[i]


def _bin_starts(edges: np.ndarray) -> tuple[np.ndarray, np.float32, np.float32]:
    """Float32 starts of the extended bins (0 below the range, 1..n_bins, n_bins + 1 above) and the linear
    map that guesses a value's bin. starts[e] is the smallest float32 in bin e, so float32 comparisons
    against it are exactly np.histogram's float64 comparisons against the edges (the last bin is closed)."""
    edges = np.asarray(edges, np.float64)
    if not (np.all(np.isfinite(edges)) and np.all(np.diff(edges) >= 0) and edges[-1] > edges[0]):
        raise ValueError(f"bins must be finite and increase monotonically, got {edges}")
    up = np.float32(np.inf)
    ceil32 = [np.float32(e) if np.float32(e) >= e else np.nextafter(np.float32(e), up) for e in edges]
    above = np.nextafter(ceil32[-1], up) if ceil32[-1] == edges[-1] else ceil32[-1]
    starts = np.array([-np.inf, *ceil32[:-1], above, np.inf], np.float32)
    n_bins = len(edges) - 1
    return starts, np.float32(edges[0]), np.float32(n_bins / (edges[-1] - edges[0]))


@numba.njit(parallel=True, cache=True)
def _add_bin_counts(values: np.ndarray, starts: np.ndarray, lo: np.float32, scale: np.float32,
                    counts: np.ndarray) -> None:
    """counts[p, e] += the values of part p of the rows in extended bin e (sum over p for the histogram);
    NaN is left out, as np.histogram leaves it out. A loop: a value's bin is a linear guess fixed by
    comparing against the bin starts (one step at most for evenly spaced edges), in registers, with no
    index arrays; each thread counts its own part of the rows into its own row of counts."""
    n_rows, n_parts, last = values.shape[0], counts.shape[0], counts.shape[1] - 1  # extended bins 0..last
    for part in prange(n_parts):
        for i in range(part * n_rows // n_parts, (part + 1) * n_rows // n_parts):
            for v in values[i]:
                if np.isnan(v):
                    continue
                guess = (v - lo) * scale + 1
                e = 0 if guess < 0 else last if guess > last else int(guess)
                while v < starts[e]:
                    e -= 1
                while e < last and v >= starts[e + 1]:
                    e += 1
                counts[part, e] += 1


@numba.njit(parallel=True, cache=True)
def _pairs_above(values: np.ndarray, threshold, first_row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train index, test index and value of the entries above threshold, in row-major order (as
    np.nonzero gives them). Two loops over the rows: count, then fill from each row's offset, so the
    rows are read in parallel and the output has an exact size and a fixed order."""
    n_rows, m = values.shape
    ends = np.zeros(n_rows, np.int64)
    for i in prange(n_rows):
        for j in range(m):
            ends[i] += values[i, j] > threshold
    ends = np.cumsum(ends)
    size = ends[-1] if n_rows else 0
    train, test, value = np.empty(size, np.int32), np.empty(size, np.int32), np.empty(size, np.float32)
    for i in prange(n_rows):
        at = ends[i - 1] if i else 0
        for j in range(m):
            if values[i, j] > threshold:
                train[at], test[at], value[at] = first_row + i, j, values[i, j]
                at += 1
    return train, test, value


@numba.njit(parallel=True, cache=True)
def _merge_topk(values: np.ndarray, first_row: int, best_value: np.ndarray, best_index: np.ndarray,
                tile: int = 16) -> None:
    """Insert each column's values into its running top-k in place: value descending, ties to the lower row.
    A loop: rows come in ascending order, so a value enters only when strictly above its column's k-th
    (NaN and -inf never do), and goes after the equal values already there. Threads own tiles of adjacent
    columns and read them row by row, whole cache lines at a time."""
    n_rows, m = values.shape
    k = best_value.shape[1]
    for t in prange((m + tile - 1) // tile):
        for i in range(n_rows):
            for j in range(t * tile, min(t * tile + tile, m)):
                v = values[i, j]
                if v > best_value[j, k - 1]:
                    at = k - 1
                    while at > 0 and best_value[j, at - 1] < v:
                        best_value[j, at], best_index[j, at] = best_value[j, at - 1], best_index[j, at - 1]
                        at -= 1
                    best_value[j, at], best_index[j, at] = v, first_row + i


def influence(mask: np.ndarray, test_target: np.ndarray, topk: int = 10, threshold: float = 0.15,
              block_rows: int = 4096, full_path: str | Path | None = None,
              bins: np.ndarray = np.linspace(-1, 1, 81)) -> dict:
    """infl_ij = mean test_target[:, j] of models with train example i - of models without it, blockwise.

    Per test example the `topk` most influential training examples (value descending, ties to the lower
    index; -1 and NaN where fewer are defined), the pairs above `threshold` (value descending, then train,
    then test index; compared as numpy compares float32 values with it) and a histogram over `bins`.
    Undefined rows and NaN entries (a NaN test target makes its column NaN) are in none of them.
    """
    mask = np.asarray(mask, bool)
    n_models, n = mask.shape
    m = test_target.shape[1]
    test_target = np.ascontiguousarray(test_target, np.float32)
    starts, lo, scale = _bin_starts(bins)
    threshold = np.result_type(np.float32, threshold).type(threshold)  # a Python float: float32, as numpy
    n_in = mask.sum(0, dtype=np.int64)
    n_out = n_models - n_in
    undefined = (n_in == 0) | (n_out == 0)
    total = test_target.sum(0)
    # Safe divisors: undefined rows are overwritten with NaN, not divided.
    div_in, div_out = np.maximum(n_in, 1).astype(np.float32), np.maximum(n_out, 1).astype(np.float32)
    best_value = np.full((m, topk), -np.inf, np.float32)
    best_index = np.full((m, topk), -1, np.int32)
    pairs, counts = [], np.zeros((numba.get_num_threads(), len(starts) - 1), np.int64)
    full = None if full_path is None else np.lib.format.open_memmap(full_path, "w+", np.float32, (n, m))
    buffer = np.empty((min(block_rows, n), m), np.float32)
    for rows in _blocks(n, len(buffer)):
        infl = buffer[:rows.stop - rows.start]
        # One product per block; for 0/1 targets the sums are exact integers, so results do not
        # depend on the block size or on the order BLAS adds in.
        np.matmul(mask[:, rows].astype(np.float32).T, test_target, out=infl)
        _held_out_difference(infl, total, div_in[rows], div_out[rows], undefined[rows])
        if full is not None:
            full[rows] = infl
        _add_bin_counts(infl, starts, lo, scale, counts)
        pairs.append(_pairs_above(infl, threshold, rows.start))
        _merge_topk(infl, rows.start, best_value, best_index)
    if full is not None:
        full.flush()
        del full
    pair_train, pair_test, pair_value = (np.concatenate(p) for p in zip(*pairs))
    order = np.lexsort((pair_test, pair_train, -pair_value))
    best_value[best_index < 0] = np.nan  # fewer than k defined training examples
    return {
        "topk_index": best_index, "topk_value": best_value, "pair_train": pair_train[order],
        "pair_test": pair_test[order], "pair_value": pair_value[order], "histogram": counts.sum(0)[1:-1], "bins": bins,
        "n_undefined_train": int(undefined.sum()),
    }


def consistency_scores(mask: np.ndarray, target: np.ndarray, model_ratio: np.ndarray) -> dict:
    """C-score (Jiang et al. 2021): held-out mean target per subset ratio, averaged over the ratios."""
    mask, model_ratio = np.asarray(mask, bool), np.asarray(model_ratio)
    per_ratio = {}
    for ratio in np.unique(model_ratio):
        chosen = model_ratio == ratio
        n_out, sum_out, sq_out, _, _ = _masked_sums(~mask[chosen], target[chosen])
        per_ratio[float(ratio)] = _mean_var(n_out, sum_out, sq_out)[0].astype(np.float32)
    stacked = np.stack(list(per_ratio.values()))
    defined = np.isfinite(stacked).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):  # nanmean without its empty-slice warning
        cscore = np.where(defined > 0, np.nansum(stacked, 0) / defined, np.nan)
    return {"per_ratio": per_ratio, "cscore": cscore.astype(np.float32)}


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for finding `positives` (e.g. relabeled examples); NaN scores ignored."""
    from sklearn.metrics import (
        roc_auc_score,  # sklearn is slow to import and only this helper needs it
    )

    defined = np.isfinite(scores)
    return float(roc_auc_score(np.asarray(positives)[defined], np.asarray(scores)[defined]))
