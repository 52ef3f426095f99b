"""Leave-one-out memorization and influence from a `train_splits.py --plan_kind loo` store.

Per seed s the store holds a model on all n planned examples and, for each left-out example i, a model
on every example but i (same seed: same initialisation, same batch order without i). Then

    mem(i)     = mean_s [ t_full,s(i) − t_without i,s(i) ]          (the memorization-in-CL paper's train_whole.py)
    infl(i, j) = mean_s [ t_full,s(j) − t_without i,s(j) ]          for test example j

with t the softmax probability of the label (or 0/1 correctness), over the seeds whose two models are
both stored; the standard error is the sample std of the per-seed differences over √seeds (NaN with one
seed). The files have the subset estimator's formats: scores in dataset order, NaN for the examples not
left out; n_in and n_out count the full and leave-one-out models used.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from memorization.plan import Plan, loo_layout
from memorization.score_format import compare_with, counts_in_dataset_order, in_dataset_order, save_scores
from memorization.store import CorruptModelFile, SubsetStore
from utils.errors import ConfigError

BINS = np.linspace(-1, 1, 81)


def read_loo_store(store: SubsetStore, plan: Plan, target: str, allow_partial: bool) -> dict:
    """Final-epoch targets: full models' on every train and test example, each leave-one-out model's on its
    left-out example and on the test set; NaN where a model is missing or unreadable."""
    positions, n_seeds = loo_layout(plan)
    n_loo, m = len(positions), plan.settings["n_test"]
    full_train = np.full((n_seeds, plan.inclusion_mask.shape[1]), np.nan, np.float32)
    full_test = np.full((n_seeds, m), np.nan, np.float32)
    loo_self = np.full((n_loo, n_seeds), np.nan, np.float32)
    loo_test = np.full((n_loo, n_seeds, m), np.nan, np.float32)
    stored = store.stored_models() & set(range(plan.n_models))
    n_read = 0
    for model_id in sorted(stored):
        try:
            model = store.read_model(model_id, plan)
        except CorruptModelFile as error:
            print(f"warning: {error} (not used; train_splits.py retrains it)", file=sys.stderr)
            continue
        n_read += 1
        seed, slot = divmod(model_id, n_loo + 1)
        train, test = model[f"{target}_train"][-1], model[f"{target}_test"][-1]
        if slot == 0:
            full_train[seed], full_test[seed] = train, test
        else:
            loo_self[slot - 1, seed], loo_test[slot - 1, seed] = train[positions[slot - 1]], test
    if n_read == 0:
        raise ConfigError(f"{store.folder} holds no finished model yet; run train_splits.py first")
    if n_read < plan.n_models and not allow_partial:
        raise ConfigError(f"{store.folder} holds {n_read} of the plan's {plan.n_models} models; finish it with "
                          f"train_splits.py or pass --allow_partial to use the {n_read}")
    return {"positions": positions, "n_seeds": n_seeds, "n_models": n_read, "self_diff": full_train[:, positions].T
            - loo_self, "test_diff": full_test[None] - loo_test}


def loo_memorization(self_diff: np.ndarray) -> dict:
    """Mean over seeds of the per-seed differences [L, S] (NaN where a pair is missing), its SE and counts."""
    present = np.isfinite(self_diff)
    count = present.sum(1)
    values = np.where(present, self_diff, 0.0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mem = values.sum(1) / count  # NaN where no seed has both models
        spread = (np.where(present, values - mem[:, None], 0.0) ** 2).sum(1)
        se = np.sqrt(spread / (count - 1) / count)
    se[count < 2] = np.nan
    return {"mem": mem.astype(np.float32), "se": se.astype(np.float32), "count": count.astype(np.int32)}


def _influence_outputs(infl: np.ndarray, rows: np.ndarray, topk: int, threshold: float) -> dict:
    """The subset estimator's influence file for the [L, m] leave-one-out matrix (rows: dataset indices)."""
    filled = np.where(np.isfinite(infl), infl, -np.inf)
    k = min(topk, len(infl))
    order = np.argsort(-filled, axis=0, kind="stable")[:k].T  # [m, k], ties to the lower index
    value = np.take_along_axis(filled.T, order, 1)
    topk_index = np.full((infl.shape[1], topk), -1, np.int64)
    topk_value = np.full((infl.shape[1], topk), np.nan, np.float32)
    defined = np.isfinite(value)
    topk_index[:, :k] = np.where(defined, rows[order], -1)
    topk_value[:, :k] = np.where(defined, value, np.nan)
    train, test = np.nonzero(filled >= np.float32(threshold))
    by_value = np.lexsort((test, train, -filled[train, test]))
    return {"topk_index": topk_index, "topk_value": topk_value, "pair_train": rows[train[by_value]],
            "pair_test": test[by_value], "pair_value": filled[train, test][by_value].astype(np.float32),
            "histogram": np.histogram(infl[np.isfinite(infl)], BINS)[0], "bins": BINS}


def seed_stability(self_diff: np.ndarray, compare: np.ndarray | None) -> dict:
    """How the scores settle with seeds: Spearman of the first s seeds' mean with the --compare scores (s = 1..S),
    and the split-half agreement (even against odd seeds) of the leave-one-out scores themselves."""
    from scipy.stats import spearmanr
    out = {}
    if compare is not None:
        for s in range(1, self_diff.shape[1] + 1):
            mem = loo_memorization(self_diff[:, :s])["mem"]
            both = np.isfinite(mem) & np.isfinite(compare)
            if both.sum() > 2:
                out[f"spearman_with_compare_seeds_{s}"] = float(spearmanr(mem[both], compare[both]).statistic)
    if self_diff.shape[1] >= 2:
        even, odd = (loo_memorization(self_diff[:, half])["mem"] for half in (slice(0, None, 2), slice(1, None, 2)))
        both = np.isfinite(even) & np.isfinite(odd)
        if both.sum() > 2:
            out["spearman_split_half"] = float(spearmanr(even[both], odd[both]).statistic)
    return out


def score_loo_store(args: argparse.Namespace, store: SubsetStore, plan: Plan) -> tuple[dict, dict, dict, list, list]:
    """eval_splits.py on a leave-one-out store: writes the score files and a short report; returns the result,
    the summary, the sidecar and the files and report pages for the MLflow run."""
    if getattr(args, "datamodels", False):
        raise ConfigError(f"{store.folder} is a leave-one-out store, and a datamodel is fitted on random subsets; "
                          f"drop --datamodels or pass a subset store")
    data = read_loo_store(store, plan, args.target, args.allow_partial)
    rows = plan.train_indices[data["positions"]]
    n_total = plan.settings["n_train_total"]
    final = loo_memorization(data["self_diff"])
    out = Path(args.out)
    stem = out.with_suffix("")
    scores = in_dataset_order(final["mem"], rows, n_total)
    spearman_with_compare = compare_with(args.compare, scores) if args.compare else None  # before any file
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(f"{stem}_se.npy", in_dataset_order(final["se"], rows, n_total))
    counts = counts_in_dataset_order(final["count"], rows, n_total)
    for name in ("n_in", "n_out"):  # full models and leave-one-out models: one pair per seed
        np.save(f"{stem}_{name}.npy", counts)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(data["test_diff"]).sum(1)
        infl = np.where(valid > 0, np.nansum(data["test_diff"], 1) / np.maximum(valid, 1), np.nan).astype(np.float32)
    np.savez(f"{stem}_influence.npz", **_influence_outputs(infl, rows, args.influence_topk, args.influence_threshold))
    defined = np.isfinite(final["mem"])
    summary = {"n_models": data["n_models"], "n_models_planned": plan.n_models, "n_loo_examples": len(rows),
               "loo_seeds": data["n_seeds"], "n_undefined": int((~defined).sum()),
               "mean": float(np.nanmean(final["mem"])) if defined.any() else float("nan"),
               "fraction_memorized": float(np.mean(final["mem"][defined] >= args.mem_threshold)) if defined.any()
               else float("nan"), "median_se": float(np.nanmedian(final["se"])) if np.isfinite(final["se"]).any()
               else float("nan")}
    compare = None
    if args.compare:
        summary["spearman_with_compare"] = spearman_with_compare
        compare = np.load(args.compare, allow_pickle=False)[rows]
    summary |= seed_stability(data["self_diff"], compare)
    sidecar = {"estimator": "loo", "dataset": plan.settings["dataset"], "n": int(n_total),
               "label_fingerprint": plan.settings["label_fingerprint"], "label_noise": plan.settings["label_noise"],
               "seed": plan.settings["seed"], "plan_hash": plan.hash, "n_models": data["n_models"],
               "n_models_planned": plan.n_models, "loo_seeds": data["n_seeds"], "target": args.target,
               "epoch": plan.settings["training"]["n_epochs"], "n_undefined": int(n_total - defined.sum()),
               "files": {"se": f"{stem.name}_se.npy", "n_in": f"{stem.name}_n_in.npy",
                         "n_out": f"{stem.name}_n_out.npy", "influence": f"{stem.name}_influence.npz"}}
    save_scores(out, scores, sidecar)
    report = write_loo_report(Path(f"{stem}_report"), summary, args)
    print(f"{out}: leave-one-out memorization of {int(defined.sum())} examples from {data['n_models']} models "
          f"({data['n_seeds']} seeds); the other {n_total - int(defined.sum())} training examples are NaN")
    for key, value in summary.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    files = [out, Path(f"{stem}.json")] + [Path(f"{stem}_{k}") for k in ("se.npy", "n_in.npy", "n_out.npy",
                                                                          "influence.npz")]
    return {"scores": scores, "summary": summary, "memorization": final, "influence": infl}, summary, sidecar, files, report


def write_loo_report(folder: Path, summary: dict, args: argparse.Namespace) -> list[Path]:
    """report.md: the summary, and the agreement with --compare as seeds are added."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# Leave-one-out memorization", "",
             f"mem(i) = p_full(i) − p_without_i(i) ({args.target}), averaged over {summary['loo_seeds']} seeds "
             f"with one full model each; {summary['n_loo_examples']} examples left out.", "",
             "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()
              if not k.startswith("spearman_with_compare_seeds_")]
    seeds = [(int(k.rsplit("_", 1)[1]), v) for k, v in summary.items() if k.startswith("spearman_with_compare_seeds_")]
    if seeds:
        lines += ["", f"Spearman with `{args.compare}` using the first s seeds:", "", "| seeds | Spearman |", "|---|---|"]
        lines += [f"| {s} | {v:.3f} |" for s, v in seeds]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return [path]
