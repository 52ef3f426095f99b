"""Attribution scored as the field scores it: the linear datamodeling score (LDS; Park et al. 2023, TRAK; dattri)
of the influence matrix and of the linear datamodels on models held out from their fit, and the correlation with
measured leave-one-out effects.

Held-out models come from a second store of the same examples (`--lds_store`), or from this store: the last
`--lds_holdout` share of its models, left out of every score of the evaluation. The influence matrix is scored on
the held-out models' targets (what it is computed from), the datamodels on their margins (what they fit). A
leave-one-out store of the same examples (`--loo_store`, train_splits.py --plan_kind loo) gives, for each
example it leaves out, its measured effect on every test example (mean over its seeds), compared with that
example's row of the influence matrix.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from memorization.lds import linear_datamodeling_score, loo_correlation
from memorization.loo import read_loo_store
from memorization.plan import is_loo
from memorization.store import SubsetStore
from utils.errors import ConfigError

MODEL_AXIS = {"train": 1, "test": 1, "prob_train": 1, "correct_train": 1, "correct_test": 1, "mask": 0, "ratio": 0,
              "margin": 0}


def requested(args: argparse.Namespace) -> bool:
    return bool(args.lds_holdout or args.lds_store or args.loo_store)


def hold_out(data: dict, share: float) -> dict:
    """Split off the last `share` of the models (at least 2, leaving at least 2): `data` keeps the others, the
    held-out models' masks, final test targets and margins are returned."""
    n = len(data["model_ids"])
    count = int(round(share * n))
    if count < 2 or n - count < 2:
        raise ConfigError(f"--lds_holdout {share:g} of {n} models leaves {count} held out and {n - count} to score; "
                          f"each needs at least 2: train more models or change the share")
    held = {"mask": data["mask"][-count:], "test": data["test"][-1][-count:], "model_ids": data["model_ids"][-count:],
            "margin": None if data.get("margin") is None else data["margin"][-count:]}
    for key, axis in MODEL_AXIS.items():
        if data.get(key) is not None:
            data[key] = np.take(data[key], np.arange(n - count), axis=axis)
    data["model_ids"] = data["model_ids"][:n - count]
    return held


def _same_examples(plan, other, flag: str, path: str) -> None:
    same = (other.settings["label_fingerprint"] == plan.settings["label_fingerprint"]
            and np.array_equal(other.train_indices, plan.train_indices)
            and other.settings["n_test"] == plan.settings["n_test"])
    if not same:
        raise ConfigError(f"{flag} {path} holds models of other examples (dataset, labels or class range differ); "
                          f"pass a store trained on the same examples")


def held_out_store(args: argparse.Namespace, plan, load_store) -> dict:
    """The models of --lds_store, checked to be of the same examples; `load_store` is eval_driver's reader."""
    store = SubsetStore(args.lds_store)
    other = store.load_plan()
    if is_loo(other) or other.kind == "stream":
        raise ConfigError(f"--lds_store {args.lds_store} is a {other.kind} store; pass a subset store (the held-out "
                          f"models must be trained on random subsets)")
    _same_examples(plan, other, "--lds_store", args.lds_store)
    data = load_store(store, other, args)
    return {"mask": data["mask"], "test": data["test"][-1], "model_ids": data["model_ids"], "margin": data.get("margin")}


def loo_store_of(args: argparse.Namespace, plan):
    """--loo_store's store and plan, checked to be a leave-one-out store of the same data (run before any file
    of the evaluation is written)."""
    store = SubsetStore(args.loo_store)
    loo_plan = store.load_plan()
    if not is_loo(loo_plan):
        raise ConfigError(f"--loo_store {args.loo_store} is not a leave-one-out store; pass the --out of "
                          f"train_splits.py --plan_kind loo on the same dataset")
    if loo_plan.settings["label_fingerprint"] != plan.settings["label_fingerprint"] or \
            loo_plan.settings["n_test"] != plan.settings["n_test"]:
        raise ConfigError(f"--loo_store {args.loo_store} holds models of other data (labels or test set differ); "
                          f"pass a leave-one-out store of the same dataset")
    return store, loo_plan


def dense_datamodels(path: Path, rows: np.ndarray, n_test: int) -> np.ndarray:
    """θ [n_train, n_test] from a NAME_datamodels.npz (COO with training examples as dataset indices)."""
    with np.load(path) as stored:
        theta = np.zeros((len(rows), n_test), np.float32)
        theta[np.searchsorted(rows, stored["train_index"]), stored["test_index"]] = stored["value"]
    return theta


def score_attribution(args: argparse.Namespace, plan, held: dict | None, influence_full: Path,
                      datamodels: Path | None) -> tuple[dict, list[str]]:
    """LDS of the influence matrix (and datamodels) on the held-out models, LOO correlations; summary and the
    report's section."""
    influence = np.nan_to_num(np.load(influence_full, mmap_mode="r"))  # undefined rows predict nothing
    summary, lines = {}, ["", "## Attribution scores", ""]
    if held is not None:
        result = linear_datamodeling_score(influence, held["mask"], held["test"])
        summary |= {"lds_influence": result["lds"], "lds_influence_defined": result["n_defined"],
                    "lds_models": result["n_models"]}
        source = f"--lds_store {args.lds_store}" if args.lds_store else f"the last {result['n_models']} models"
        lines.append(f"Linear datamodeling score (Spearman over {result['n_models']} held-out models ({source}) of "
                     f"the output predicted by summing the attribution over each model's training examples with "
                     f"its actual {args.target}, mean over {result['n_defined']} test examples): influence "
                     f"{result['lds']:.3f}.")
        if datamodels is not None and held.get("margin") is not None:
            theta = dense_datamodels(datamodels, plan.train_indices, influence.shape[1])
            fitted = linear_datamodeling_score(theta, held["mask"], held["margin"])
            summary |= {"lds_datamodels": fitted["lds"], "lds_datamodels_defined": fitted["n_defined"]}
            lines.append(f"Datamodels (on the margin they fit): LDS {fitted['lds']:.3f} over {fitted['n_defined']} "
                         f"test examples.")
    if args.loo_store:
        store, loo_plan = loo_store_of(args, plan)
        loo = read_loo_store(store, loo_plan, args.target, allow_partial=True)
        left_out = loo_plan.train_indices[loo["positions"]]
        inside = np.isin(left_out, plan.train_indices)
        effect = np.nanmean(loo["test_diff"], 1)[inside]  # [L, m]: full − without i, mean over seeds
        rows = np.searchsorted(plan.train_indices, left_out[inside])
        result = loo_correlation(influence[rows], effect)
        summary |= {"loo_pearson_influence": result["pearson"], "loo_spearman_influence": result["spearman"],
                    "loo_mean_per_test_spearman_influence": result["mean_per_test_spearman"],
                    "loo_examples": int(inside.sum())}
        lines.append(f"Against {int(inside.sum())} measured leave-one-out effects (--loo_store {args.loo_store}, "
                     f"{loo['n_seeds']} seeds): Pearson {result['pearson']:.3f}, Spearman {result['spearman']:.3f} "
                     f"over {result['n_pairs']} (example, test example) pairs; mean per-test-example Spearman "
                     f"{result['mean_per_test_spearman']:.3f}.")
    return summary, lines
