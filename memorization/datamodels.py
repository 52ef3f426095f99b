"""Linear datamodels (Ilyas et al., ICML 2022, "Datamodels: Predicting Predictions from Training Data").

K models, model k trained on the subset `mask[k]` of the n training examples. For each test example j a
linear function of the inclusion mask, f_j(S) = θ_jᵀ 1_S + b_j, is fitted by LASSO (L1-regularised least
squares; rows = models, features = training examples) to the model's margin on j:
  - "logits": the correct-class margin z_y - max_{c≠y} z_c, from the stored logits (train_splits.py
    --save_logits; float16 logits, the difference taken in float32);
  - "prob" (no logits stored): the logit of the stored label probability, log p - log(1 - p), which is
    z_y - logsumexp_{c≠y} z_c. The probabilities are float16, so p is first clipped to
    [2^-24, 1 - 2^-11] (the smallest positive float16 and the largest float16 below 1): the margin lies in
    [log(2^-24 / (1 - 2^-24)), log(2047)] = [-16.636, 7.624], finite also where p rounded to 0 or 1.
The models are split (seeded) into a fit part and a validation part. Per test example, a path of
`n_alphas` regularisations (log-spaced from the smallest alpha giving θ = 0 down to eps times it) is fitted
on the fit part with centred columns (the intercept is fitted, not penalised) by scikit-learn's
`lasso_path`, one test example at a time: given a 2-D target it fits a multi-task (L2,1) LASSO, not
independent ones. The alpha with the lowest validation MSE is kept. The test examples go in blocks, so
memory stays bounded for large m: the dense [K, n] design matrix (float64, or float32 beyond 2^27
entries), [n, block] products, and θ kept sparse (COO); no dense [m, n] matrix.

The fit is compared with the held-out influence of the same margin (mean margin of the models holding
training example i minus that of the others, all models): per test example the Pearson correlation of
θ_j with the influence column over defined training examples, and the overlap of the top-k sets.
"""
from __future__ import annotations

import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from memorization.estimator import blocks
from memorization.store import CorruptModelFile
from utils.errors import ConfigError
from utils.threads import usable_cores

PROB_CLIP = (2.0**-24, 1.0 - 2.0**-11)  # smallest positive float16, largest float16 below 1
MARGIN_RANGE = (math.log(PROB_CLIP[0]) - math.log1p(-PROB_CLIP[0]), math.log(PROB_CLIP[1]) - math.log1p(-PROB_CLIP[1]))
MIN_FIT_MODELS, MIN_VAL_MODELS = 8, 2
DENSE_FLOAT64_ENTRIES = 2**27  # a larger design matrix is held in float32 (1 GiB in float64 here)
GRAM_MAX_FEATURES = 4096  # a precomputed Gram matrix when n is at most this and at most the fit models
SCATTER_POINTS = 200_000  # (i, j) pairs in the report's scatter: all pairs of up to 20 test examples


def margin_from_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """z_y - max_{c≠y} z_c per example: logits [..., m, classes], labels [m]; float32."""
    z = np.asarray(logits, np.float32)
    labels = np.asarray(labels, np.int64)
    label_axis = np.broadcast_to(labels[:, None], (*z.shape[:-1], 1))
    correct = np.take_along_axis(z, label_axis, -1)[..., 0]
    others = z.copy()
    np.put_along_axis(others, label_axis, -np.inf, -1)
    return (correct - others.max(-1)).astype(np.float32)


def margin_from_prob(prob: np.ndarray) -> np.ndarray:
    """log p - log(1 - p) of the label probability, p clipped to PROB_CLIP first; float32."""
    p = np.clip(np.asarray(prob, np.float64), *PROB_CLIP)
    return (np.log(p) - np.log1p(-p)).astype(np.float32)


def stored_margin(model: dict, kind: str, labels: np.ndarray | None) -> np.ndarray:
    """One model file's margin [m] on the test examples after its last recorded epoch."""
    if kind == "prob":
        return margin_from_prob(model["prob_test"][-1])
    logits = model.get("logits_test")
    if logits is None or logits.shape[:2] != model["prob_test"].shape or logits.ndim != 3:
        raise CorruptModelFile(f"model {int(model['model_id'])}'s file lacks test logits of the right shape")
    margin = margin_from_logits(logits[-1], labels)
    if not np.isfinite(margin).all():
        raise CorruptModelFile(f"model {int(model['model_id'])}'s test logits are not finite")
    return margin


def models_needed(val_fraction: float) -> int:
    """The fewest models that leave MIN_FIT_MODELS to fit and MIN_VAL_MODELS to validate."""
    k = MIN_FIT_MODELS + MIN_VAL_MODELS
    while k - _n_val(k, val_fraction) < MIN_FIT_MODELS:
        k += 1
    return k


def _n_val(n_models: int, val_fraction: float) -> int:
    return max(MIN_VAL_MODELS, int(round(val_fraction * n_models)))


def check_enough_models(n_models: int, val_fraction: float) -> None:
    needed = models_needed(val_fraction)
    if n_models < needed:
        raise ConfigError(f"--datamodels needs at least {needed} models ({MIN_FIT_MODELS} to fit and "
                          f"{_n_val(needed, val_fraction)} to validate at --datamodel_val_fraction {val_fraction:g}) "
                          f"but the store holds {n_models}; train more models or leave out --datamodels")


def split_models(n_models: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted positions of the fit and validation models: a seeded permutation, its first part validates."""
    check_enough_models(n_models, val_fraction)
    order = np.random.default_rng(seed).permutation(n_models)
    n_val = _n_val(n_models, val_fraction)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _topk(index: np.ndarray, value: np.ndarray, k: int) -> np.ndarray:
    """The k indices of the largest values, ties to the lower index."""
    return index[np.lexsort((index, -value))][:k]


def fit_datamodels(mask: np.ndarray, margin: np.ndarray, val_fraction: float = 0.1, n_alphas: int = 30,
                   eps: float = 1e-3, seed: int = 0, topk: int = 10, block: int = 256, max_iter: int = 1000,
                   tol: float = 1e-4, threads: int | None = None) -> dict:
    """θ (COO: test_index, train_index, value; positions in `mask`'s columns), bias, alpha and validation R²
    per test example, top-k by θ (-1 and NaN where fewer nonzeros), validation predictions and Spearman.
    The test examples are fitted on `threads` threads (default: the usable cores), in blocks of `block`."""
    from scipy.stats import spearmanr
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import lasso_path  # slow to import: only here

    mask = np.asarray(mask, bool)
    margin = np.asarray(margin, np.float64)
    n_models, n = mask.shape
    m = margin.shape[1]
    fit, val = split_models(n_models, val_fraction, seed)
    dtype = np.float64 if len(fit) * n <= DENSE_FLOAT64_ENTRIES else np.float32
    x = mask[fit].astype(dtype)
    x_mean = x.mean(0)
    x -= x_mean
    x = np.asfortranarray(x)
    x_val = mask[val].astype(dtype) - x_mean
    y_mean = margin[fit].mean(0)
    y = (margin[fit] - y_mean).astype(dtype)
    gram = x.T @ x if n <= min(len(fit), GRAM_MAX_FEATURES) else None
    out = {"bias": np.empty(m, np.float32), "alpha": np.full(m, np.nan, np.float32),
           "val_r2": np.full(m, np.nan, np.float32), "converged": np.ones(m, bool),
           "topk_index": np.full((m, topk), -1, np.int64), "topk_value": np.full((m, topk), np.nan, np.float32),
           "val_pred": np.empty((len(val), m), np.float32)}
    test_index, train_index, values = [], [], []

    def fit_one(j: int, xy: np.ndarray, alpha_max: float) -> tuple[np.ndarray, np.ndarray, float, bool]:
        """θ_j, its validation predictions, alpha and convergence: the path, then the best validated alpha."""
        if alpha_max <= 0:  # a margin constant over the fit models: θ = 0
            return np.zeros(n), np.full(len(val), y_mean[j]), math.nan, True
        alphas = np.geomspace(alpha_max, alpha_max * eps, n_alphas)
        _, coefs, _, n_iter = lasso_path(
            x, np.ascontiguousarray(y[:, j]), alphas=alphas, precompute=False if gram is None else gram,
            Xy=None if gram is None else np.ascontiguousarray(xy), copy_X=False, check_input=False,
            return_n_iter=True, max_iter=max_iter, tol=tol)
        support = np.flatnonzero(np.any(coefs != 0, 1))
        predicted = x_val[:, support] @ coefs[support] + y_mean[j]  # [val models, alphas]
        best = int(np.argmin(((predicted - margin[val, j, None]) ** 2).mean(0)))  # ties: the larger alpha
        return coefs[:, best], predicted[:, best], alphas[best], n_iter[best] < max_iter

    started = time.perf_counter()
    # Threads: the coordinate descent releases the GIL, and each test example's fit is the same alone.
    # Non-convergence is recorded per test example instead of warned (the filter is the process's, set once).
    with warnings.catch_warnings(), ThreadPoolExecutor(max(1, threads or usable_cores())) as pool:
        warnings.simplefilter("ignore", ConvergenceWarning)
        for cols in blocks(m, block):
            xy = x.T @ y[:, cols]  # [n, block]: the first alpha of every path of the block
            alpha_max = np.abs(xy).max(0) / len(fit)
            fits = pool.map(fit_one, range(cols.start, cols.stop), xy.T, alpha_max)
            for j, (theta, prediction, alpha, converged) in zip(range(cols.start, cols.stop), fits):
                actual = margin[val, j]
                nonzero = np.flatnonzero(theta)
                out["bias"][j], out["alpha"][j], out["converged"][j] = \
                    y_mean[j] - x_mean[nonzero] @ theta[nonzero], alpha, converged
                out["val_pred"][:, j] = prediction
                spread = ((actual - actual.mean()) ** 2).sum()
                if spread > 0:
                    out["val_r2"][j] = 1 - ((prediction - actual) ** 2).sum() / spread
                best_k = _topk(nonzero, theta[nonzero], topk)
                out["topk_index"][j, :len(best_k)], out["topk_value"][j, :len(best_k)] = best_k, theta[best_k]
                test_index.append(np.full(len(nonzero), j, np.int32))
                train_index.append(nonzero.astype(np.int64))
                values.append(theta[nonzero].astype(np.float32))
    out["seconds"] = time.perf_counter() - started
    out["test_index"] = np.concatenate(test_index) if test_index else np.zeros(0, np.int32)
    out["train_index"] = np.concatenate(train_index) if train_index else np.zeros(0, np.int64)
    out["value"] = np.concatenate(values) if values else np.zeros(0, np.float32)
    actual = margin[val].ravel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input gives NaN
        out["val_spearman"] = float(spearmanr(out["val_pred"].ravel(), actual).statistic)
    out.update(fit_models=fit, val_models=val, n_fit=len(fit), n_val=len(val))
    return out


def compare_with_influence(mask: np.ndarray, margin: np.ndarray, fitted: dict, topk: int = 10,
                           block: int = 128, n_sample: int | None = None) -> dict:
    """Per test example, Pearson of θ_j with the held-out influence of the margin over the defined training
    examples, and |top-k by θ ∩ top-k by influence| / k; the (θ, influence) pairs of a sample of test examples."""
    mask = np.asarray(mask, bool)
    n_models, n = mask.shape
    m = margin.shape[1]
    weights = mask.astype(np.float32)
    n_in = mask.sum(0)
    n_out = n_models - n_in
    defined = (n_in > 0) & (n_out > 0)
    rows = np.flatnonzero(defined)
    n_sample = n_sample or max(1, min(20, SCATTER_POINTS // max(len(rows), 1), m))
    sample = np.unique(np.linspace(0, m - 1, n_sample).round().astype(int))
    pearson, overlap = np.full(m, np.nan, np.float32), np.zeros(m, np.float32)
    order = np.argsort(fitted["test_index"], kind="stable")
    test_index, train_index, value = (fitted[key][order] for key in ("test_index", "train_index", "value"))
    scatter_theta, scatter_infl = [], []
    for cols in blocks(m, block):
        target = np.asarray(margin[:, cols], np.float32)
        with_i = (weights.T @ target).astype(np.float64)[rows]  # [defined, block]
        total = target.sum(0, dtype=np.float64)
        infl = with_i / n_in[rows, None] - (total - with_i) / n_out[rows, None]
        theta = np.zeros((n, cols.stop - cols.start))
        at = slice(*np.searchsorted(test_index, [cols.start, cols.stop]))
        theta[train_index[at], test_index[at] - cols.start] = value[at]
        theta = theta[rows]
        t, f = theta - theta.mean(0), infl - infl.mean(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            pearson[cols] = (t * f).sum(0) / np.sqrt((t * t).sum(0) * (f * f).sum(0))
        by_influence = rows[np.argsort(-infl, axis=0, kind="stable")[:topk]]  # ties to the lower index
        for c, j in enumerate(range(cols.start, cols.stop)):
            chosen = fitted["topk_index"][j][fitted["topk_index"][j] >= 0]
            overlap[j] = len(np.intersect1d(chosen, by_influence[:, c])) / topk
            if j in sample:
                scatter_theta.append(theta[:, c])
                scatter_infl.append(infl[:, c])
    return {"pearson": pearson, "overlap": overlap, "sample": sample,
            "scatter_theta": np.concatenate(scatter_theta), "scatter_influence": np.concatenate(scatter_infl)}


def write_datamodels(path: Path, mask: np.ndarray, margin: np.ndarray, kind: str, rows: np.ndarray,
                     model_ids: list[int], val_fraction: float, n_alphas: int, topk: int, seed: int) -> dict:
    """Fit, compare and write NAME_datamodels.npz (training examples as dataset indices through `rows`);
    returns the summary numbers and what the report draws."""
    fitted = fit_datamodels(mask, margin, val_fraction=val_fraction, n_alphas=n_alphas, seed=seed, topk=topk)
    compared = compare_with_influence(mask, margin, fitted, topk=topk)
    m = margin.shape[1]
    np.savez(path, test_index=fitted["test_index"], train_index=rows[fitted["train_index"]],
             value=fitted["value"], bias=fitted["bias"], alpha=fitted["alpha"], val_r2=fitted["val_r2"],
             converged=fitted["converged"],
             topk_index=np.where(fitted["topk_index"] >= 0, rows[np.maximum(fitted["topk_index"], 0)], -1),
             topk_value=fitted["topk_value"], influence_pearson=compared["pearson"],
             topk_overlap=compared["overlap"], margin_kind=np.array(kind),
             margin_range=np.array(MARGIN_RANGE if kind == "prob" else (-np.inf, np.inf)),
             val_models=np.asarray(model_ids)[fitted["val_models"]], val_spearman=np.float64(fitted["val_spearman"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-NaN medians of degenerate stores are NaN
        summary = {"datamodel_fit_models": fitted["n_fit"], "datamodel_val_models": fitted["n_val"],
                   "datamodel_val_r2_mean": float(np.nanmean(fitted["val_r2"])),
                   "datamodel_val_r2_median": float(np.nanmedian(fitted["val_r2"])),
                   "datamodel_val_spearman": fitted["val_spearman"],
                   "datamodel_nonzeros_mean": len(fitted["value"]) / m,
                   "datamodel_influence_pearson_median": float(np.nanmedian(compared["pearson"])),
                   "datamodel_topk_overlap_mean": float(compared["overlap"].mean()),
                   "datamodel_unconverged": int((~fitted["converged"]).sum()),
                   "datamodel_fit_seconds": fitted["seconds"]}
    report = {"kind": kind, "n_models": len(mask), "n_fit": fitted["n_fit"], "n_val": fitted["n_val"],
              "n_train": mask.shape[1], "topk": topk, "sample": compared["sample"], "summary": summary,
              "scatter_theta": compared["scatter_theta"], "scatter_influence": compared["scatter_influence"]}
    return {"summary": summary, "report": report, "path": Path(path)}


def scatter_figure(report: dict):
    """θ against influence of the margin for every (i, j) pair of the sampled test examples."""
    import matplotlib.pyplot as plt

    theta, infl = report["scatter_theta"], report["scatter_influence"]
    figure, axes = plt.subplots(figsize=(6, 4.5))
    axes.scatter(infl, theta, s=4, alpha=0.3, color="tab:blue", rasterized=True)
    axes.axhline(0, color="gray", linewidth=0.5)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.corrcoef(infl, theta)[0, 1] if theta.size > 1 and theta.std() > 0 else float("nan")
    axes.set_xlabel(f"held-out influence of train i on the {report['kind']} margin of test j")
    axes.set_ylabel("datamodel θ_ij (LASSO)")
    axes.set_title(f"Datamodel vs influence: {len(report['sample'])} test examples × {report['n_train']} train "
                   f"(Pearson {pooled:.3f})", fontsize=9)
    figure.tight_layout()
    return figure


def report_section(report: dict) -> list[str]:
    """The report's markdown section on the datamodels."""
    s = report["summary"]
    margin = ("the correct-class margin z_y - max other z_c from the stored logits" if report["kind"] == "logits"
              else f"log p - log(1 - p) of the stored float16 label probability p, clipped to "
                   f"[{MARGIN_RANGE[0]:.3f}, {MARGIN_RANGE[1]:.3f}] (no logits stored)")
    return ["", "## Datamodels", "",
            f"Linear datamodels (Ilyas et al. 2022): per test example, LASSO of {margin} on the inclusion masks, "
            f"fitted on {report['n_fit']} of the {report['n_models']} models; the regularisation was chosen per "
            f"test example on the other {report['n_val']}. Validation R² per test example: mean "
            f"{s['datamodel_val_r2_mean']:.3g}, median {s['datamodel_val_r2_median']:.3g}. Spearman of predicted and "
            f"actual validation margins, pooled over test examples {s['datamodel_val_spearman']:.3g} (it includes the "
            f"differences between test examples' mean margins, which the bias alone predicts; R² does not), "
            f"{s['datamodel_nonzeros_mean']:.3g} nonzero θ per test example. Against the held-out influence of the "
            f"same margin: median Pearson {s['datamodel_influence_pearson_median']:.3g}, mean top-{report['topk']} "
            f"overlap {s['datamodel_topk_overlap_mean']:.3g} (datamodel_vs_influence.png).", "",
            f"Ilyas et al. fitted CIFAR-10 datamodels on hundreds of thousands of models. With {report['n_fit']} "
            f"models for {report['n_train']} training examples this fit is noisy: the LASSO keeps at most about as "
            f"many nonzero θ per test example as it has models, and a single validation R² rests on "
            f"{report['n_val']} models."]
