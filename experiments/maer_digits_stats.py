"""The numbers maer_digits.py computes from its runs: means and spreads over seeds, Acc and FM of an accuracy
matrix, paired differences and their 95% paired-t reading, and forgetting per memorization bucket."""
from __future__ import annotations

import numpy as np

from continual.evaluation import BUCKETS, forgetting, memorization_buckets, per_task_key


# -- over seeds ----------------------------------------------------------------------------------------------
def mean_std(values) -> tuple[float, float]:
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def acc_fm(matrix: np.ndarray) -> tuple[float, float]:
    last = matrix.shape[0] - 1
    return float(np.mean(matrix[last])), forgetting(matrix, last)


def paired(a: list[float], b: list[float]) -> tuple[float, float, int, int]:
    """Mean and standard error of the per-seed differences a − b, and how many seeds have a > b."""
    d = np.asarray(a) - np.asarray(b)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se, int((d > 0).sum()), len(d)


SEEDS = [0]  # number of seeds of the run, set in maer_digits.run()
T_CRITICAL = {}  # seeds -> two-sided 95% critical value of Student's t with seeds − 1 degrees of freedom


def significant(d: float, se: float, n: int | None = None) -> bool:
    """A paired difference outside the 95% paired-t interval (needs at least two seeds)."""
    from scipy.stats import t
    n = n or SEEDS[0]
    if n < 2 or not np.isfinite(se):
        return False
    if n not in T_CRITICAL:
        T_CRITICAL[n] = float(t.ppf(0.975, n - 1))
    return bool(abs(d) > T_CRITICAL[n] * se)


# -- part c: forgetting per memorization bucket ----------------------------------------------------------
def bucket_curves(history, run_ids: list[str], n_tasks: int) -> dict:
    """Per seed and bucket: A[t, i] = train accuracy (%) of task i's examples in the bucket after task t.

    `history(run_id, key)` reads a metric's {step: value} back from MLflow (Runner.history)."""
    out = {b: [] for b in BUCKETS}
    for run_id in run_ids:
        for b in BUCKETS:
            a = np.full((n_tasks, n_tasks), np.nan)
            for i in range(n_tasks):
                for step, value in history(run_id, per_task_key(f"train_acc_{b}", i)).items():
                    a[step - 1, i] = value  # logged at step = tasks trained
            out[b].append(a)
    return out


def bucket_summary(curves: dict, n_tasks: int) -> dict:
    """Per bucket, per seed: mean over past tasks (i < T−1) of accuracy at learning, at the end, and their drop."""
    last = n_tasks - 1
    summary = {}
    for b, per_seed in curves.items():
        learned, end, drop, past = [], [], [], []
        for a in per_seed:
            diag, final = np.diag(a)[:last], a[last, :last]
            both = np.isfinite(diag) & np.isfinite(final)
            learned.append(float(np.mean(diag[both])) if both.any() else np.nan)
            end.append(float(np.mean(final[both])) if both.any() else np.nan)
            drop.append(float(np.mean(diag[both] - final[both])) if both.any() else np.nan)
            # mean accuracy of the past tasks i < t after task t, for t = 1..T−1
            past.append([float(np.nanmean(a[t, :t])) if np.isfinite(a[t, :t]).any() else np.nan
                         for t in range(1, n_tasks)])
        summary[b] = {"learned": learned, "end": end, "forgetting": drop, "past": np.array(past)}
    return summary


def bucket_counts(scores: np.ndarray, thresholds=(0.1, 0.25)) -> dict[str, int]:
    bucket = memorization_buckets(scores, *thresholds)
    return {name: int((bucket == k).sum()) for k, name in enumerate(BUCKETS)} | {"undefined": int((bucket < 0).sum())}


def task_counts(scores: np.ndarray, labels: np.ndarray, bucket_index: int, thresholds=(0.1, 0.25)) -> list[int]:
    bucket = memorization_buckets(scores, *thresholds)
    return [int(((labels // 2 == t) & (bucket == bucket_index)).sum()) for t in range(5)]
