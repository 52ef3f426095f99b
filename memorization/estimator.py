"""Held-out memorization and influence estimates (Feldman & Zhang 2020) and consistency scores.

K models, model k trained on the subset `mask[k]` of the n training examples, each evaluated on all
n training and m test examples. A target is 0/1 correctness or the softmax probability of the label.
Scores of an example that was never left out (or never included) are undefined: NaN, never 0.
Every sum over models is a vectorised numpy reduction or a float32 matrix product. The passes of
`influence` over each block of the [n, m] matrix (its mean arithmetic, histogram, pairs and top-k) are
numba kernels on every core: a numpy pass runs on one thread while BLAS uses them all, and at small K
those passes, not the product, took most of the time. The kernels compile on first use (about 10 s) and
are cached beside this file (numba's cache=True); a later process loads them in about a second.
OpenBLAS's idle threads spin for about 0.1 s after each product by default and took the cores from these
passes (at K=200 the passes ran twice as long); eval_splits.py sets OPENBLAS_THREAD_TIMEOUT=4 before numpy
loads, so that they sleep. A script that calls `influence` itself sets it the same way, before importing numpy.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numba
import numpy as np
from numba import prange

if "NUMBA_THREADING_LAYER" not in os.environ:
    # The OpenMP layer's threads spin between kernels and take the cores from BLAS's threads (and BLAS's
    # from them) while the blocks alternate; the workqueue layer's threads sleep. On 2 shared cores that
    # made `influence` about 1.5x faster at K=200 and 3x at K=50. It holds for the whole process (numba
    # is used nowhere else here) and cannot run kernels from two threads at once.
    numba.config.THREADING_LAYER = "workqueue"


def blocks(size: int, block: int) -> Iterator[slice]:
    """Consecutive slices of `range(size)`, `block` long (the last may be shorter)."""
    for start in range(0, size, block):
        yield slice(start, min(start + block, size))


def _masked_sums(mask: np.ndarray, target: np.ndarray, block: int = 8192) -> tuple[np.ndarray, ...]:
    """Per column: count, sum and sum of squares of target where mask holds, and over all models."""
    n = mask.shape[1]
    count, total, total_sq, masked, masked_sq = (np.empty(n, np.float32) for _ in range(5))
    for cols in blocks(n, block):  # column blocks bound the float32 copy of the mask
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


def _bin_starts(edges: np.ndarray) -> tuple[np.ndarray, np.float32, np.float32, np.float32]:
    """Float32 starts of the extended bins (0 below the range, 1..n_bins, n_bins + 1 above), and the linear
    map `(v - lo) * scale + 1` that guesses a value's bin with the distance `tol` from a whole number
    beyond which the guess is exact. starts[e] is the smallest float32 in bin e, so float32 comparisons
    against it are exactly np.histogram's float64 comparisons against the edges (the last bin is closed).
    tol covers the float32 rounding of the map and how far the edges are from evenly spaced; for uneven
    edges it is 0.5, and every value is compared against the starts."""
    edges = np.asarray(edges, np.float64)
    if not (np.all(np.isfinite(edges)) and np.all(np.diff(edges) >= 0) and edges[-1] > edges[0]):
        raise ValueError(f"bins must be finite and increase monotonically, got {edges}")
    up = np.float32(np.inf)
    ceil32 = [np.float32(e) if np.float32(e) >= e else np.nextafter(np.float32(e), up) for e in edges]
    above = np.nextafter(ceil32[-1], up) if ceil32[-1] == edges[-1] else ceil32[-1]
    starts = np.array([-np.inf, *ceil32[:-1], above, np.inf], np.float32)
    n_bins = len(edges) - 1
    width = (edges[-1] - edges[0]) / n_bins
    uneven = np.max(np.abs(edges - edges[0] - np.arange(n_bins + 1) * width)) / width
    rounding = 16 * 2.0**-24 * (n_bins + 4 + abs(edges[0]) / width)  # a few float32 ulps of the guess
    tol = min(0.5, 1e-3 + uneven + rounding)
    return starts, np.float32(edges[0]), np.float32(1 / width), np.float32(tol)


@numba.njit(cache=True)
def _count_bins(row: np.ndarray, starts: np.ndarray, lo: np.float32, scale: np.float32, tol: np.float32,
                counts: np.ndarray, guess: np.ndarray) -> None:
    """counts[e] += the row's values in extended bin e; NaN is left out, as np.histogram leaves it out.
    Two loops: the first, vectorised, keeps each value's linear guess (in `guess`, as long as the row)
    where it is farther than tol from a bin edge; the second counts, and places the other values by
    comparing them with the bin starts. numpy needed index arrays and several passes for the same."""
    last = len(counts) - 1
    for j in range(len(row)):
        g = (row[j] - lo) * scale + np.float32(1)
        frac = g - np.floor(g)  # NaN for NaN, which fails the test below
        g = min(max(g, np.float32(0)), np.float32(last))
        guess[j] = np.int32(g) if (frac > tol) & (frac < 1 - tol) else np.int32(-1)
    for j in range(len(row)):
        e = guess[j]
        if e < 0:
            v = row[j]
            if np.isnan(v):
                continue
            g = (v - lo) * scale + np.float32(1)
            e = 0 if g < 0 else last if g > last else int(g)
            while v < starts[e]:  # one step at most for evenly spaced edges
                e -= 1
            while e < last and v >= starts[e + 1]:
                e += 1
        counts[e] += 1


@numba.njit(cache=True)
def _held_out_difference(row: np.ndarray, total: np.ndarray, div_in: np.float32, div_out: np.float32) -> None:
    """In place, a row of the product (sums over the models with the training example) becomes the mean
    with it minus the mean without it: numpy's float32 operations in numpy's order, so the same bits.
    (Divisors as scalars and each value read once, so that the loop is vectorised.)"""
    for j in range(len(row)):
        with_i = row[j]
        row[j] = with_i / div_in - (total[j] - with_i) / div_out


@numba.njit(cache=True)
def _count_above(row: np.ndarray, threshold) -> int:
    """How many of the row's values are above threshold (a loop: np.sum(row > t) makes a bool array)."""
    above = 0
    for j in range(len(row)):
        above += np.int32(row[j] > threshold)  # an integer sum, so that the loop is vectorised
    return above


@numba.njit(cache=True)
def _insert(best_value: np.ndarray, best_index: np.ndarray, value: np.float32, index: int) -> None:
    """Put value (above best_value[-1]) into a descending top-k list, after the values equal to it."""
    at = len(best_value) - 1
    while at > 0 and best_value[at - 1] < value:
        best_value[at], best_index[at] = best_value[at - 1], best_index[at - 1]
        at -= 1
    best_value[at], best_index[at] = value, index


@numba.njit(cache=True)
def _update_topk(row: np.ndarray, index: int, kth: np.ndarray, best_value: np.ndarray, best_index: np.ndarray,
                 chunk: int = 32) -> None:
    """Insert row (training example `index`) into each column's running top-k: value descending, ties to
    the lower index; kth is a contiguous copy of best_value[:, -1]. A loop, as a stable selection is one:
    rows come in ascending order, so a value enters only when strictly above its column's k-th (NaN and
    -inf never do), after the equal values already there. A vectorised test first skips the chunks of
    columns where nothing enters, most of them once the lists have filled."""
    for start in range(0, len(row), chunk):
        stop = min(start + chunk, len(row))
        enters = False
        for j in range(start, stop):
            enters |= row[j] > kth[j]
        if enters:
            for j in range(start, stop):
                if row[j] > kth[j]:
                    _insert(best_value[j], best_index[j], row[j], index)
                    kth[j] = best_value[j, -1]


@numba.njit(parallel=True, cache=True)
def _row_passes(infl: np.ndarray, first_row: int, total: np.ndarray, div_in: np.ndarray, div_out: np.ndarray,
                undefined: np.ndarray, threshold, starts: np.ndarray, lo: np.float32, scale: np.float32,
                tol: np.float32, counts: np.ndarray, best_value: np.ndarray, best_index: np.ndarray) -> np.ndarray:
    """In place, row i of the product (sums over the models with train i) becomes the mean with i minus the
    mean without i (NaN for an undefined row), with numpy's float32 operations in numpy's order, so the
    same bits. Its bin counts and its top-k candidates go to the thread's part p of the rows: counts[p],
    best_value[p] and best_index[p] (the histogram is the sum over p, the top-k the merge of the parts);
    its count of values above threshold is returned. One loop reads each row once, on every core, where
    numpy made about ten single-threaded passes over the whole block."""
    n_rows, n_parts = infl.shape[0], counts.shape[0]
    n_above = np.zeros(n_rows, np.int64)
    for part in prange(n_parts):
        kth, guess = best_value[part, :, -1].copy(), np.empty(infl.shape[1], np.int32)
        for i in range(part * n_rows // n_parts, (part + 1) * n_rows // n_parts):
            row = infl[i]
            if undefined[i]:
                row[:] = np.nan
                continue
            _held_out_difference(row, total, div_in[i], div_out[i])
            _count_bins(row, starts, lo, scale, tol, counts[part], guess)
            n_above[i] = _count_above(row, threshold)
            _update_topk(row, first_row + i, kth, best_value[part], best_index[part])
    return n_above


@numba.njit(parallel=True, cache=True)
def _pairs_above(infl: np.ndarray, threshold, first_row: int,
                 n_above: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train index, test index and value of the entries above threshold, in row-major order (as np.nonzero
    gives them). The rows' counts, from the pass before, place each row's entries, so rows fill in
    parallel into arrays of the exact size, in a fixed order; rows with nothing above are skipped."""
    ends = np.cumsum(n_above)
    size = ends[-1] if len(ends) else 0
    train, test, value = np.empty(size, np.int32), np.empty(size, np.int32), np.empty(size, np.float32)
    for i in prange(infl.shape[0]):
        if n_above[i] == 0:
            continue
        at = ends[i] - n_above[i]
        for j in range(infl.shape[1]):
            if infl[i, j] > threshold:
                train[at], test[at], value[at] = first_row + i, j, infl[i, j]
                at += 1
    return train, test, value


@numba.njit(cache=True)
def _merge_topk(best_value: np.ndarray, best_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column's top-k of the parts' lists [part, column, k], each value descending with ties to the
    lower index and -inf, -1 in its empty slots: a k-way merge per column (once per call, a few ms)."""
    n_parts, m, k = best_value.shape
    value, index = np.full((m, k), -np.inf, np.float32), np.full((m, k), -1, np.int32)
    for j in range(m):
        head = np.zeros(n_parts, np.int64)  # each part's first entry not taken yet
        for slot in range(k):
            pick = -1
            for p in range(n_parts):
                if head[p] == k or best_index[p, j, head[p]] < 0:
                    continue  # nothing left in part p
                v, i = best_value[p, j, head[p]], best_index[p, j, head[p]]
                if pick < 0 or v > value[j, slot] or v == value[j, slot] and i < index[j, slot]:
                    pick, value[j, slot], index[j, slot] = p, v, i
            if pick < 0:
                break
            head[pick] += 1
    return value, index


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
    starts, lo, scale, tol = _bin_starts(bins)
    threshold = np.result_type(np.float32, threshold).type(threshold)  # a Python float: float32, as numpy
    n_in = mask.sum(0, dtype=np.int64)
    n_out = n_models - n_in
    undefined = (n_in == 0) | (n_out == 0)
    total = test_target.sum(0)
    # Safe divisors: undefined rows are overwritten with NaN, not divided.
    div_in, div_out = np.maximum(n_in, 1).astype(np.float32), np.maximum(n_out, 1).astype(np.float32)
    n_parts = numba.get_num_threads()  # each thread's rows have their own bin counts and top-k lists
    counts = np.zeros((n_parts, len(starts) - 1), np.int64)
    best_value = np.full((n_parts, m, topk), -np.inf, np.float32)
    best_index = np.full((n_parts, m, topk), -1, np.int32)
    pairs = []
    full = None if full_path is None else np.lib.format.open_memmap(full_path, "w+", np.float32, (n, m))
    buffer = np.empty((min(block_rows, n), m), np.float32)
    for rows in blocks(n, len(buffer)):
        infl = buffer[:rows.stop - rows.start]
        # One product per block; for 0/1 targets the sums are exact integers, so results do not
        # depend on the block size or on the order BLAS adds in.
        np.matmul(mask[:, rows].astype(np.float32).T, test_target, out=infl)
        n_above = _row_passes(infl, rows.start, total, div_in[rows], div_out[rows], undefined[rows], threshold,
                              starts, lo, scale, tol, counts, best_value, best_index)
        if full is not None:
            full[rows] = infl
        pairs.append(_pairs_above(infl, threshold, rows.start, n_above))
    if full is not None:
        full.flush()
        del full
    # Pairs come in train-then-test order, so a stable sort on the value alone gives the full order.
    pair_train, pair_test, pair_value = (np.concatenate(p) for p in zip(*pairs))
    order = descending_stable_order(pair_value)
    best_value, best_index = _merge_topk(best_value, best_index)
    best_value[best_index < 0] = np.nan  # fewer than k defined training examples
    return {
        "topk_index": best_index, "topk_value": best_value, "pair_train": pair_train[order],
        "pair_test": pair_test[order], "pair_value": pair_value[order], "histogram": counts.sum(0)[1:-1],
        "bins": bins, "n_undefined_train": int(undefined.sum()),
    }


def descending_stable_order(values: np.ndarray) -> np.ndarray:
    """np.argsort(-values, kind="stable") for float32 values without NaN, about 3x faster: each value's bits,
    mapped to integers of the same order, and its position make one unique 64-bit key, and an unstable
    integer sort of unique keys is stable (numpy's stable sort of floats is a merge sort)."""
    if len(values) >= 2**32:
        return np.argsort(-values, kind="stable")
    bits = (np.asarray(values, np.float32) + np.float32(0)).view(np.int32)  # + 0: -0.0 becomes 0.0, its equal
    ordered = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))  # signed integers in the floats' order
    key = ((~ordered).astype(np.int64) + 2**31).astype(np.uint64) << np.uint64(32) \
        | np.arange(len(values), dtype=np.uint64)
    return (np.sort(key) & np.uint64(0xFFFFFFFF)).astype(np.intp)


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
