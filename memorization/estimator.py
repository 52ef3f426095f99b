"""Held-out memorization and influence estimates (Feldman & Zhang 2020) and consistency scores.

K models, model k trained on the subset `mask[k]` of the n training examples, each evaluated on all
n training and m test examples. A target is 0/1 correctness or the softmax probability of the label.
Scores of an example that was never left out (or never included) are undefined: NaN, never 0.
Pure numpy: every sum over models is a vectorised reduction or a float32 matrix product.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np


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


def _bin_counts(values: np.ndarray, edges: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """np.histogram(values, edges)[0] for float32 values and evenly spaced edges, about 5x faster."""
    n_bins = len(edges) - 1
    if not np.allclose(np.diff(edges), (edges[-1] - edges[0]) / n_bins, rtol=1e-6, atol=0):
        return np.histogram(values, edges)[0]
    # Index e of the extended bins: 0 below the range, 1..n_bins, n_bins + 1 above (the last bin is
    # closed). starts[e] is the smallest float32 in bin e, so float32 comparisons against it are exact.
    up = np.float32(np.inf)
    ceil32 = [np.float32(e) if np.float32(e) >= e else np.nextafter(np.float32(e), up) for e in edges]
    above = np.nextafter(ceil32[-1], up) if ceil32[-1] == edges[-1] else ceil32[-1]
    starts = np.array([-np.inf, *ceil32[:-1], above, np.inf], np.float32)
    lo, scale = np.float32(edges[0]), np.float32(n_bins / (edges[-1] - edges[0]))
    counts = np.zeros(n_bins + 3, np.int64)
    flat = values.ravel()
    for part in _blocks(flat.size, chunk):  # chunks stay in cache across the passes below
        v = flat[part]
        guess = (v - lo) * scale + 1  # off by at most one bin at a boundary, fixed by the comparisons
        index = np.clip(guess, 0, n_bins + 1, out=guess).astype(np.intp)
        index -= v < starts.take(index)
        index += v >= starts.take(index + 1)
        counts += np.bincount(index, minlength=n_bins + 3)
    return counts[1:n_bins + 1]


def _merge_topk(best_value: np.ndarray, best_index: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column's k best of the running best and the candidates: value descending, then row ascending."""
    m, k = best_value.shape
    col = np.concatenate([np.repeat(np.arange(m), k), cols])
    value = np.concatenate([best_value.ravel(), values])
    row = np.concatenate([best_index.ravel(), rows])
    order = np.lexsort((row, -value, col))
    col_sorted = col[order]
    rank = np.arange(order.size) - np.searchsorted(col_sorted, col_sorted)  # position within its column
    keep = order[rank < k]  # every column has at least its k running entries: exactly m * k kept
    return value[keep].reshape(m, k), row[keep].reshape(m, k)


def _block_topk_candidates(infl: np.ndarray, k: int) -> np.ndarray:
    """Mask of each column's k best rows of a block (ties to the lower row), so a merge stays small."""
    kth = np.partition(infl, infl.shape[0] - k, axis=0)[infl.shape[0] - k]
    above = infl > kth
    ties = infl == kth
    places = k - above.sum(0)  # left for rows equal to the k-th value
    crowded = np.flatnonzero(ties.sum(0) > places)  # few columns, unless many are constant
    ties[:, crowded] &= np.cumsum(ties[:, crowded], axis=0, dtype=np.int32) <= places[crowded]
    return above | ties


def influence(mask: np.ndarray, test_target: np.ndarray, topk: int = 10, threshold: float = 0.15,
              block_rows: int = 4096, full_path: str | Path | None = None,
              bins: np.ndarray = np.linspace(-1, 1, 81)) -> dict:
    """infl_ij = mean test_target[:, j] of models with train example i - of models without it, blockwise."""
    mask = np.asarray(mask, bool)
    n_models, n = mask.shape
    m = test_target.shape[1]
    test_target = np.ascontiguousarray(test_target, np.float32)
    n_in = mask.sum(0, dtype=np.int64)
    n_out = n_models - n_in
    undefined = (n_in == 0) | (n_out == 0)
    total = test_target.sum(0)
    # Safe divisors: undefined rows are overwritten with NaN after the division.
    div_in, div_out = np.maximum(n_in, 1).astype(np.float32), np.maximum(n_out, 1).astype(np.float32)
    best_value = np.full((m, topk), -np.inf, np.float32)
    best_index = np.full((m, topk), -1, np.int64)
    pairs, histogram = [], np.zeros(len(bins) - 1, np.int64)
    full = None if full_path is None else np.lib.format.open_memmap(full_path, "w+", np.float32, (n, m))
    block_rows = min(block_rows, n)
    in_buf, out_buf = np.empty((block_rows, m), np.float32), np.empty((block_rows, m), np.float32)
    for rows in _blocks(n, block_rows):
        b = rows.stop - rows.start
        infl, out_mean = in_buf[:b], out_buf[:b]
        # One product per block; for 0/1 targets the sums are exact integers, so results do not
        # depend on the block size or on the order BLAS adds in.
        np.matmul(mask[:, rows].astype(np.float32).T, test_target, out=infl)
        np.subtract(total, infl, out=out_mean)
        out_mean /= div_out[rows, None]
        infl /= div_in[rows, None]
        infl -= out_mean
        bad = undefined[rows]
        infl[bad] = np.nan
        if full is not None:
            full[rows] = infl
        row_ids = np.arange(rows.start, rows.stop)
        if bad.any():  # rare: compact the defined rows so the passes below need no NaN checks
            infl, row_ids = infl[~bad], row_ids[~bad]
        histogram += _bin_counts(infl, bins)
        flat = infl.ravel()
        hits = np.flatnonzero(flat > threshold)  # 1-d nonzero: several times faster than 2-d
        pairs.append((row_ids[hits // m], hits % m, flat[hits]))
        candidates = infl > best_value[:, -1]  # only rows that beat a column's current k-th best
        if np.count_nonzero(candidates) > 4 * m * topk:  # e.g. the first block: cut it to its own top-k
            candidates &= _block_topk_candidates(infl, topk)
        cand = np.flatnonzero(candidates)
        best_value, best_index = _merge_topk(best_value, best_index, row_ids[cand // m], cand % m, flat[cand])
    if full is not None:
        full.flush()
        del full
    pair_train, pair_test, pair_value = (np.concatenate(p) for p in zip(*pairs))
    order = np.lexsort((pair_test, pair_train, -pair_value))
    best_value[best_index < 0] = np.nan  # fewer than k defined training examples
    return {
        "topk_index": best_index.astype(np.int32), "topk_value": best_value,
        "pair_train": pair_train[order].astype(np.int32), "pair_test": pair_test[order].astype(np.int32),
        "pair_value": pair_value[order].astype(np.float32), "histogram": histogram, "bins": bins,
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
