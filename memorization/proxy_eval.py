"""`eval_splits.py --proxies`: single-run memorization proxies against the subset estimator on the same data.

The first --proxy_models models of the store (one by default: a single run) give the proxies, from what their
training recorded: learned-late (their correctness after each recorded epoch), cumulative sample loss (the label
cross-entropy summed over the recorded epochs), forgetting events (Toneva et al.) and the memorization-aware
replay model's learned iteration (the step from which an example stayed correct in its training passes). Each
proxy is defined on the examples its models trained on (pooled over them). The reference is the subset estimator
computed from the other models only, so a proxy model never scores itself. Each proxy's cost is its models'
training time plus its computation; the estimator's, all its models' training time plus the estimator.

On a stream store the proxies are those of one continual run (its first learner): forgetting events over the
whole stream and the cumulative loss over the task boundaries, against the in-stream estimator of the others.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from memorization.estimator import memorization
from memorization.forgetting import forgetting_values
from memorization.proxies import agreement, agreement_table, cumulative_loss, learned_iteration, learned_late, pooled
from memorization.store import SubsetStore
from utils.errors import ConfigError


def _timed(compute):
    started = time.perf_counter()
    value = compute()
    return value, time.perf_counter() - started


def check_proxy_models(n_models: int, count: int) -> None:
    """The proxies take `count` models and the estimator at least two others."""
    if n_models < count + 2:
        raise ConfigError(f"--proxies uses {count} model(s) for the proxies and the others for the estimator, but "
                          f"the store has {n_models}; train more models or lower --proxy_models")


def proxy_values(models: list[dict], included: np.ndarray, epochs: list[int]) -> dict[str, tuple[np.ndarray, float]]:
    """Each proxy pooled over the proxy models (NaN where none trained on the example), with its compute seconds."""
    def per_model(compute) -> np.ndarray:
        return np.stack([np.where(inc, compute(model, inc), np.nan) for model, inc in zip(models, included)])

    proxies = {}
    if len(epochs) > 1:  # one record says nothing about when an example was learned or how its loss went
        proxies["learned_late"] = lambda: pooled(per_model(
            lambda m, inc: learned_late(m["correct_train"], epochs)), included)
        proxies["cumulative_loss"] = lambda: pooled(per_model(
            lambda m, inc: cumulative_loss(m["prob_train"].astype(np.float32))), included)
    if all("forget_events_train" in m for m in models):
        proxies["forgetting_events"] = lambda: pooled(per_model(
            lambda m, inc: forgetting_values(m["forget_events_train"], m["never_learned_train"], inc)), included)
    if all("learned_step_train" in m for m in models):
        proxies["learned_iteration"] = lambda: pooled(per_model(
            lambda m, inc: learned_iteration(m["learned_step_train"])), included)
    return {name: _timed(compute) for name, compute in proxies.items()}


def score_proxies(store: SubsetStore, plan, data: dict, args: argparse.Namespace, relabeled: np.ndarray | None,
                  singleton: np.ndarray | None, stem: Path) -> dict:
    """The proxy table (rows, markdown, summary metrics) and the proxies' values file; see the module docstring."""
    count = args.proxy_models
    ids, mask, target = data["model_ids"], data["mask"], data["train"][-1]
    check_proxy_models(len(ids), count)
    models = [store.read_model(model_id, plan) for model_id in ids[:count]]
    reference, estimator_seconds = _timed(lambda: memorization(mask[count:], target[count:])["mem"])
    seconds = store.training_seconds()
    proxy_train = sum(seconds.get(m, np.nan) for m in ids[:count])
    estimator_train = sum(seconds.get(m, np.nan) for m in ids[count:])
    values = proxy_values(models, mask[:count], list(data["epochs"]))
    rows = [{"name": f"subset estimator ({len(ids) - count} models)", "seconds": estimator_train + estimator_seconds,
             **agreement(reference, reference, relabeled=relabeled, singleton=singleton, n_boot=args.proxy_boot)}]
    notes = [f"Proxies from model(s) {', '.join(map(str, ids[:count]))} (its training record at epochs "
             f"{', '.join(map(str, data['epochs']))}); reference: the subset estimator from the other "
             f"{len(ids) - count} models. Cost: training seconds of the models used plus computing seconds."]
    if len(data["epochs"]) < 2:
        notes.append("learned_late and cumulative_loss need several recorded epochs: train with --record_epochs "
                     "1,2,...,E to have them.")
    return write_table(rows, values, reference, proxy_train, notes, relabeled, singleton, args, stem)


def write_table(rows: list[dict], values: dict, reference: np.ndarray, proxy_train: float, notes: list[str],
                relabeled, singleton, args: argparse.Namespace, stem: Path) -> dict:
    """Each proxy's agreement row after the reference's `rows`; NAME_proxies.md / .json / .npz; summary metrics."""
    for name, (value, compute_seconds) in values.items():
        rows.append({"name": name, "seconds": proxy_train + compute_seconds,
                     **agreement(value, reference, relabeled=relabeled, singleton=singleton, n_boot=args.proxy_boot)})
    if not np.isfinite(proxy_train):
        notes.append("This store does not record training times (trained before they were kept): costs are NaN.")
    else:
        notes.append("A model's training seconds are its share of its group's (its vectorised ensemble's, "
                     "--ensemble) time, warm-up of the worker's first group included: trained alone, one model "
                     "costs more than its share.")
    table = agreement_table(rows)
    path = Path(f"{stem}_proxies.md")
    path.write_text("# Memorization proxies against the subset estimator\n\n" + "\n".join(notes) + "\n\n" + table
                    + "\n")
    Path(f"{stem}_proxies.json").write_text(json.dumps(rows, indent=2, default=float))
    np.savez(f"{stem}_proxies.npz", reference=reference, **{name: v for name, (v, _) in values.items()})
    summary = {}
    for row in rows[1:]:
        for key in ("spearman", "pearson", "top_10pct", "auroc_relabeled", "auroc_singleton", "seconds"):
            if key in row and np.isfinite(row[key]):
                summary[f"proxies/{row['name']}/{key}"] = float(row[key])
    summary["proxies/estimator_seconds"] = float(rows[0]["seconds"])
    print(table)
    return {"rows": rows, "table": table, "summary": summary,
            "files": [path, Path(f"{stem}_proxies.json"), Path(f"{stem}_proxies.npz")]}


def score_stream_proxies(store: SubsetStore, plan, data: dict, tasks: np.ndarray, args: argparse.Namespace,
                         relabeled: np.ndarray | None, singleton: np.ndarray | None, stem: Path) -> dict:
    """The proxies of one continual run, the first --proxy_models learners of a stream store: its forgetting
    events over the whole stream (counted in its training passes, main.py --forgetting_events' definition) and
    its cumulative loss over the task boundaries from the example's own task to the end; against the in-stream
    estimator of the other learners at the stream's end."""
    count = args.proxy_models
    ids, mask = data["model_ids"], data["mask"]
    check_proxy_models(len(ids), count)
    models = [store.read_model(model_id, plan) for model_id in ids[:count]]
    if not all("forget_events_train" in m for m in models):
        raise ConfigError(f"{store.folder}'s learners did not record forgetting events (trained before they were "
                          f"recorded); train the plan again into a new --out to score proxies")
    reference, estimator_seconds = _timed(lambda: memorization(mask[count:], data["train"][-1][count:])["mem"])
    seconds = store.training_seconds()
    proxy_train = sum(seconds.get(m, np.nan) for m in ids[:count])
    included = mask[:count]
    after_own = np.arange(len(data["train"]))[:, None] >= tasks[None]  # [T, n]: boundaries from the own task on
    values = {
        "forgetting_events": _timed(lambda: pooled(np.stack([
            np.where(inc, forgetting_values(m["forget_events_train"], m["never_learned_train"], inc), np.nan)
            for m, inc in zip(models, included)]), included)),
        "cumulative_loss": _timed(lambda: pooled(np.stack([
            np.where(inc, cumulative_loss(np.where(after_own, m["prob_train"].astype(np.float32), 1.0)), np.nan)
            for m, inc in zip(models, included)]), included)),
    }
    rows = [{"name": f"in-stream estimator ({len(ids) - count} learners)",
             "seconds": sum(seconds.get(m, np.nan) for m in ids[count:]) + estimator_seconds,
             **agreement(reference, reference, relabeled=relabeled, singleton=singleton, n_boot=args.proxy_boot)}]
    notes = [f"Proxies from the continual run of learner(s) {', '.join(map(str, ids[:count]))}: forgetting events "
             f"over the whole stream, and the label cross-entropy summed over the task boundaries from the "
             f"example's own task to the end; reference: the in-stream estimator at the stream's end from the other "
             f"{len(ids) - count} learners. Cost: training seconds of the learners used plus computing seconds."]
    return write_table(rows, values, reference, proxy_train, notes, relabeled, singleton, args, stem)
