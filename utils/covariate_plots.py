"""Figures of plasticity covariates over a run (matplotlib, no display needed)."""
from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

# (metric key, figure title) of the covariate families logged per task; per-group keys are `key/G`, and a
# family's figure is the artifact `plasticity/<the key's last part>.png`.
COVARIATE_PLOTS: list[tuple[str, str]] = [
    ("covariates/dead_frac", "Dead units (never active on the probe)"),
    ("covariates/dormant_frac", "ReDO-dormant units (score ≤ τ, network in eval mode)"),
    ("covariates/low_activity_frac", "Low-activity units (active on < 1% of inputs × positions)"),
    ("covariates/effective_rank", "Effective rank of the features"),
    ("covariates/stable_rank", "Stable rank of the features (99% of Σσ)"),
    ("covariates/attn_entropy_mean", "Attention entropy / ln T (mean over inputs, heads, queries)"),
    ("covariates/weight_mean_abs", "Mean |w| of the weights"),
    ("covariates/age_steps_mean", "Mean neuron age (steps since last firing)"),
    ("covariates/age_tokens_mean", "Mean neuron age (tokens since last firing)"),
    ("plasticity/resets", "Resets per task"),
]


def _natural_key(text: str) -> list:
    """Sort key that orders embedded numbers numerically (layers.2 before layers.10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _overall_key(history: dict[str, list[float]], prefix: str) -> str | None:
    """The overall series of a family: `prefix` itself, else `prefix_mean` (e.g. effective_rank_mean)."""
    for key in (prefix, prefix + "_mean"):
        if key in history:
            return key
    return None


def covariate_figure(history: dict[str, list[float]], prefix: str, title: str, x_label: str = "task"):
    """One line per `prefix/G` key (NaN as gaps) plus the overall key drawn thicker; x = 1..len, the task."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    keys = sorted((key for key in history if key.startswith(prefix + "/")), key=_natural_key)
    for key in keys:
        values = np.asarray(history[key], dtype=float)
        axes.plot(np.arange(1, len(values) + 1), values, linewidth=1.2, label=key[len(prefix) + 1:])
    overall = _overall_key(history, prefix)
    if overall is not None:
        values = np.asarray(history[overall], dtype=float)
        axes.plot(np.arange(1, len(values) + 1), values, linewidth=3.0, color="black",
                  label="overall" if overall == prefix else overall)
    if keys or overall is not None:
        axes.legend(fontsize=7 if len(keys) > 8 else 9, ncol=1 + len(keys) // 16,
                    loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes.set_xlabel(x_label)
    axes.set_ylabel(prefix.rsplit("/", 1)[-1])
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def age_histogram(ages: dict[str, torch.Tensor | np.ndarray], unit: str, title: str):
    """One step histogram of 1 + age per group on shared log-spaced bins (log x axis)."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    arrays = {}
    for name, values in ages.items():
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().double().numpy()
        values = np.asarray(values, dtype=float).ravel()
        arrays[name] = 1.0 + values[np.isfinite(values)]
    everything = np.concatenate(list(arrays.values())) if arrays else np.zeros(0)
    if everything.size:
        high = max(float(everything.max()), 2.0)
        bins = np.geomspace(1.0, high * 1.001, 40)
        for name in sorted(arrays, key=_natural_key):
            if arrays[name].size:
                axes.hist(arrays[name], bins=bins, histtype="step", linewidth=1.3, label=name)
        axes.set_xscale("log")
        axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes.set_xlabel(f"1 + age ({unit})")
    axes.set_ylabel("units")
    axes.set_title(title)
    figure.tight_layout()
    return figure


def close(figure) -> None:
    """Release a figure's memory."""
    plt.close(figure)
