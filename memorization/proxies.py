"""Single-run memorization proxies, and how well a proxy agrees with the subset estimator's scores.

A proxy is read from what one training run records, where the subset estimator (estimator.memorization)
needs many models. Every proxy is returned so that higher = more memorized:

- learned_late: the first record from which an example stays correct to the end (later = more memorized);
  an example wrong at the last record ranks above every learned one.
- cumulative_loss: the example's label cross-entropy summed over the records (higher = more memorized).
- learned_iteration: the training step from which an example stayed correct in its own training passes, as
  the memorization-aware replay model records it (later = more memorized; never learned = NaN).

NaN means undefined (e.g. the model never saw the example), never 0; `pooled` averages a proxy over the models
that trained on each example. `agreement` compares a proxy with a reference score over the examples where
both are defined: rank and linear correlation with bootstrap intervals, overlap of the most memorized
examples, and AUROC for relabeled examples and singletons.
"""
from __future__ import annotations

import warnings

import numpy as np

from memorization.estimator import auroc

BOOT_ENTRIES = 2**21  # bootstrap samples go in chunks of about this many [sample, example] entries


def learned_late(correct: np.ndarray, epochs: np.ndarray | None = None) -> np.ndarray:
    """When each example was learned for good, from its correctness after each recorded epoch.

    correct: [E, n] 0/1 or bool, row e the correctness of every example after the e-th record (records in
    training order); a float array may hold NaN where the model did not see the example.
    Value: the 1-based position t of the first record from which the example is correct at every record
    through the last one (t = 1: correct at every record); an example wrong at the last record gets E + 1,
    later than any learned example. With `epochs` (the E recorded epoch numbers, increasing, e.g. [2, 4, 6])
    the value is the epoch number of that record instead, and never learned is epochs[-1] + 1.
    A column with any NaN gives NaN. A forgotten-then-relearned example counts from its last relearning.
    Higher = learned later = more memorized. Float64 [n].
    """
    record = np.asarray(correct)
    if record.ndim != 2 or record.shape[0] == 0:
        raise ValueError(f"correct must be [epochs, examples] with at least one epoch, got shape {record.shape}")
    n_records = record.shape[0]
    as_float = record.astype(np.float64)
    unseen = np.isnan(as_float).any(0)
    wrong = np.nan_to_num(as_float) == 0  # NaN columns are overwritten below
    # The last wrong record, -1 where none: the example stays correct from the record after it.
    any_wrong = wrong.any(0)
    last_wrong = np.where(any_wrong, n_records - 1 - np.argmax(wrong[::-1], axis=0), -1)
    first_for_good = last_wrong + 1  # 0-based; n_records: wrong at the last record
    if epochs is None:
        value = (first_for_good + 1).astype(np.float64)
    else:
        epochs = np.asarray(epochs, np.float64)
        if epochs.shape != (n_records,) or np.any(np.diff(epochs) <= 0):
            raise ValueError(f"epochs must be {n_records} increasing epoch numbers, got {epochs.tolist()}")
        value = np.append(epochs, epochs[-1] + 1)[first_for_good]
    value[unseen] = np.nan
    return value


def cumulative_loss(prob: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Sum over the E records of -log(clip(p, eps, 1)), p the softmax probability of the label: prob [E, n].

    The summed cross-entropy of the label; eps bounds one record's term at -log(eps) (16.1 for 1e-7) where
    p rounded to 0. Higher = fitted later and less = more memorized. NaN in a column gives NaN. Float64 [n].
    """
    prob = np.asarray(prob, np.float64)
    return -np.log(np.clip(prob, eps, 1.0)).sum(0)  # clip keeps NaN, and the sum passes it on


def learned_iteration(learned_step: np.ndarray) -> np.ndarray:
    """The memorization-aware replay model's proxy as a score: float64, -1 (not learned at the end) -> NaN.

    learned_step[i]: the training step from which example i was correct at every one of its training passes
    (a wrong pass resets it); -1 where the last pass was wrong. Later = more memorized. Any negative value,
    or NaN, gives NaN.
    """
    step = np.asarray(learned_step, np.float64)
    return np.where(step >= 0, step, np.nan)  # NaN >= 0 is False


def pooled(values: np.ndarray, included: np.ndarray) -> np.ndarray:
    """Per example, the mean over the P models that trained on it of their defined values: values [P, n],
    included [P, n] bool. A NaN value of a model that trained on the example (e.g. learned_iteration's
    never learned) is left out of the mean; NaN where no model trained on the example with a defined value.
    """
    values = np.asarray(values, np.float64)
    included = np.asarray(included, bool)
    if values.shape != included.shape:
        raise ValueError(f"values {values.shape} and included {included.shape} must have the same shape")
    used = included & np.isfinite(values)
    count = used.sum(0)
    total = np.where(used, values, 0.0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def auroc_of(values: np.ndarray, positives: np.ndarray) -> float:
    """AUROC of `values` (higher = more likely positive) for the positives, over the finite values only;
    NaN where those hold no positive or no negative."""
    values, positives = np.asarray(values, np.float64), np.asarray(positives, bool)
    if values.shape != positives.shape:
        raise ValueError(f"values {values.shape} and positives {positives.shape} must have the same shape")
    finite = np.isfinite(values)
    if positives[finite].all() or not positives[finite].any():
        return float("nan")
    return auroc(values[finite], positives[finite])


def _correlation(name: str, x: np.ndarray, y: np.ndarray) -> float:
    """scipy's Spearman or Pearson; NaN for fewer than two pairs or a constant input."""
    from scipy.stats import pearsonr, spearmanr

    if len(x) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input gives NaN with a warning
        return float((spearmanr if name == "spearman" else pearsonr)(x, y).statistic)


def _resampled_ranks(group: np.ndarray, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranks within each bootstrap sample, without sorting it: group [n] is the 0-based dense rank of each
    example's value (equal values share one), draws [b, n] the examples each sample drew. A drawn value's
    rank is the number of draws below it plus (its copies + 1) / 2, scipy.stats.rankdata's average.
    Returns the ranks of the draws [b, n] and the sum of squares of each sample's ranks [b], both centred
    on (n + 1) / 2 (every sample's mean rank, so exact: half-integers), and whether a sample drew one value."""
    b, n = draws.shape
    n_groups = int(group.max()) + 1
    drawn = group[draws]
    offsets = (np.arange(b) * n_groups)[:, None]
    copies = np.bincount((offsets + drawn).ravel(), minlength=b * n_groups).reshape(b, n_groups).astype(np.float64)
    mid = np.cumsum(copies, 1) - (copies - 1) / 2.0 - (n + 1) / 2.0
    return np.take_along_axis(mid, drawn, 1), np.einsum("bg,bg,bg->b", copies, mid, mid), copies.max(1) == n


def _correlation_from_sums(cov: np.ndarray, var_x: np.ndarray, var_y: np.ndarray, constant: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip(cov / np.sqrt(var_x * var_y), -1.0, 1.0)
    r[constant] = np.nan  # a constant side: its variance can round to a tiny number instead of 0
    return r


def bootstrap_correlations(x: np.ndarray, y: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Spearman and Pearson of n_boot resamples of the pairs (x_i, y_i), drawn with replacement.

    Resample r draws the pairs np.random.default_rng(seed).integers(0, n, (n_boot, n))[r]; its Spearman uses
    the ranks the resample's own ranking gives (ties averaged), found from the values' one ranking and the
    copies drawn, so no resample is sorted. Returns {"spearman": [n_boot], "pearson": [n_boot]}, NaN for a
    resample where a side is constant.
    """
    from scipy.stats import rankdata

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    rng = np.random.default_rng(seed)
    group_x = rankdata(x, method="dense").astype(np.int64) - 1
    group_y = rankdata(y, method="dense").astype(np.int64) - 1
    # Standardised values: the resample's moments come from plain sums without losing digits.
    sx, sy = ((v - v.mean()) / (v.std() or 1.0) for v in (x, y))
    out = {"spearman": np.full(n_boot, np.nan), "pearson": np.full(n_boot, np.nan)}
    chunk = max(1, BOOT_ENTRIES // max(n, 1))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, n, (b, n))  # consecutive chunks continue the one [n_boot, n] stream
        rank_x, ss_x, constant_x = _resampled_ranks(group_x, draws)
        rank_y, ss_y, constant_y = _resampled_ranks(group_y, draws)
        constant = constant_x | constant_y
        out["spearman"][start:start + b] = _correlation_from_sums(
            np.einsum("bn,bn->b", rank_x, rank_y), ss_x, ss_y, constant)
        xd, yd = sx[draws], sy[draws]
        mx, my = xd.mean(1), yd.mean(1)
        out["pearson"][start:start + b] = _correlation_from_sums(
            np.einsum("bn,bn->b", xd, yd) / n - mx * my, np.einsum("bn,bn->b", xd, xd) / n - mx * mx,
            np.einsum("bn,bn->b", yd, yd) / n - my * my, constant)
    return out


def top_overlap(proxy: np.ndarray, reference: np.ndarray, fraction: float) -> float:
    """|top-k of proxy ∩ top-k of reference| / k with k = max(1, round(fraction * n)), the top-k being the
    k highest values (ties to the lower index); both finite, of the same length n."""
    n = len(proxy)
    if n == 0:
        return float("nan")
    k = max(1, int(round(fraction * n)))
    chosen = [np.argsort(-np.asarray(v, np.float64), kind="stable")[:k] for v in (proxy, reference)]
    return len(np.intersect1d(*chosen)) / k


def _fraction_label(fraction: float) -> str:
    return f"{100 * fraction:g}"


def agreement(proxy: np.ndarray, reference: np.ndarray, *, relabeled: np.ndarray | None = None,
              singleton: np.ndarray | None = None, top_fractions: tuple[float, ...] = (0.01, 0.05, 0.1),
              n_boot: int = 1000, seed: int = 0) -> dict:
    """How a proxy agrees with a reference score (e.g. the subset estimator's memorization), per example.

    Over the n examples where both are finite: "spearman" and "pearson" (scipy), each with a percentile
    bootstrap 95% interval "<name>_lo", "<name>_hi" (2.5th and 97.5th percentiles of n_boot resamples of the
    examples with replacement, seeded: bootstrap_correlations), and for each fraction f of top_fractions
    "top_<100f>pct" = top_overlap (the share of the reference's most memorized examples that the proxy also
    ranks most memorized). With a mask [examples] of relabeled examples or of singletons,
    "auroc_relabeled" / "auroc_singleton": the proxy's AUROC for finding them, over the examples where
    the proxy is finite (auroc_of; the reference's own is auroc_of(reference, mask)).
    """
    proxy, reference = np.asarray(proxy, np.float64), np.asarray(reference, np.float64)
    if proxy.shape != reference.shape or proxy.ndim != 1:
        raise ValueError(f"proxy {proxy.shape} and reference {reference.shape} must be [examples] of one length")
    both = np.isfinite(proxy) & np.isfinite(reference)
    x, y = proxy[both], reference[both]
    n = len(x)
    out: dict = {"n": n, "top_fractions": tuple(top_fractions), "n_boot": n_boot, "seed": seed}
    boot = bootstrap_correlations(x, y, n_boot, seed) if n >= 2 and n_boot > 0 else None
    for name in ("spearman", "pearson"):
        out[name] = _correlation(name, x, y)
        lo = hi = float("nan")
        if boot is not None and np.isfinite(boot[name]).any():
            lo, hi = (float(v) for v in np.nanpercentile(boot[name], [2.5, 97.5]))
        out[f"{name}_lo"], out[f"{name}_hi"] = lo, hi
    for fraction in top_fractions:
        out[f"top_{_fraction_label(fraction)}pct"] = top_overlap(x, y, fraction)
    for key, mask in (("auroc_relabeled", relabeled), ("auroc_singleton", singleton)):
        if mask is not None:
            out[key] = auroc_of(proxy, mask)
    return out


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def _with_interval(row: dict, name: str) -> str:
    if not np.isfinite(row.get(name, float("nan"))):
        return "—"
    return f"{row[name]:.3f} [{_number(row.get(f'{name}_lo'))}, {_number(row.get(f'{name}_hi'))}]"


def agreement_table(rows: list[dict]) -> str:
    """A markdown table, one row per proxy: rows are agreement() dicts with "name" and "seconds" (the cost
    of computing the proxy) added. "—" where a value is absent or undefined (NaN)."""
    fractions: list[float] = []
    for row in rows:
        fractions += [f for f in row.get("top_fractions", ()) if f not in fractions]
    header = ["proxy", "cost (s)", "n", "Spearman [95% CI]", "Pearson [95% CI]",
              *(f"top-{_fraction_label(f)}% overlap" for f in fractions), "AUROC relabeled", "AUROC singletons"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["name"]), _number(row.get("seconds"), 2), str(row.get("n", "—")),
                 _with_interval(row, "spearman"), _with_interval(row, "pearson"),
                 *(_number(row.get(f"top_{_fraction_label(f)}pct")) for f in fractions),
                 _number(row.get("auroc_relabeled")), _number(row.get("auroc_singleton"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
