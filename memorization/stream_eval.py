"""Memorization and influence at every task boundary, from a stream plan's store (memorization/stream.py).

With learner k's target t_k,T(i) after task T (the softmax probability of example i's label over the classes seen
so far, or its 0/1 correctness) and S_k its training subset,

    mem_T(i) = mean_{k: i ∈ S_k} t_k,T(i) − mean_{k: i ∉ S_k} t_k,T(i)     for the examples of tasks 1..T,

NaN for the examples of later tasks: the held-out estimator (memorization/estimator.py) applied at each boundary
to the examples seen so far. With one task it is the stationary estimator. Influence per boundary is the same
difference on the test examples of the tasks seen so far (top-k per test example).

Forgetting of example i (task τ(i)) is its accuracy over the learners that trained on it at the end of its own
task minus at the end of the stream; the paper's claim (Kozal et al., "What is the role of memorization in
Continual Learning?") is that highly memorized examples are forgotten more: compared here between the examples
whose memorization at the end of their own task is high (≥ --mem_threshold) and low (< LOW_MEM), with Welch's
t-test.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from memorization.estimator import auroc, influence, memorization
from memorization.plan import Plan, fingerprint
from memorization.score_format import compare_with, counts_in_dataset_order, save_scores
from memorization.store import CorruptModelFile, SubsetStore
from utils.errors import ConfigError

LOW_MEM = 0.1  # the memorization-in-CL paper's low bucket (main.py's --bucket_thresholds lower edge)


def example_tasks(dataset) -> np.ndarray:
    """The task of every training example (dataset order), from its label in continual order."""
    return (dataset.train.labels.cpu().numpy() // dataset.classes_per_task).astype(np.int64)


def stream_dataset(plan: Plan, data_path: str):
    """The plan's dataset as its learners saw it: main.py's dataset flags of the plan with the plan's seed (label
    noise, class order), checked against the plan's labels."""
    from datasets import DATASETS

    settings = plan.settings
    args = argparse.Namespace(**settings["continual"], seed=settings["seed"], device="cpu", data_path=data_path,
                              download=False)
    dataset = DATASETS.get(settings["dataset"])(args)
    if fingerprint(dataset.train.labels.numpy()) != settings["label_fingerprint"]:
        raise ConfigError(f"the {settings['dataset']} training labels under {data_path} differ from those the plan "
                          f"was made for (fingerprint); point --data_path at the same files")
    return dataset


def read_stream_store(store: SubsetStore, plan: Plan, target: str, allow_partial: bool) -> dict:
    """Every readable learner's targets [T, K, n] and [T, K, m], correctness on the training set, accuracy matrices
    and seconds."""
    stored = sorted(i for i in store.stored_models() if i < plan.n_models)
    n, m, n_tasks = plan.inclusion_mask.shape[1], plan.settings["n_test"], plan.settings["n_tasks"]
    train = np.zeros((n_tasks, len(stored), n), np.float32)
    test = np.zeros((n_tasks, len(stored), m), np.float32)
    correct = np.zeros((n_tasks, len(stored), n), bool)
    accuracy, seconds, finished = [], [], []
    timing = store.training_seconds()
    for model_id in stored:
        try:
            model = store.read_model(model_id, plan)
        except CorruptModelFile as error:
            print(f"warning: {error} (not used; train_splits.py retrains it)", file=sys.stderr)
            continue
        k = len(finished)
        train[:, k], test[:, k], correct[:, k] = model[f"{target}_train"], model[f"{target}_test"], model["correct_train"]
        accuracy.append(model["accuracy"])
        seconds.append(timing.get(model_id, np.nan))
        finished.append(model_id)
    if not finished:
        raise ConfigError(f"{store.folder} holds no finished learner yet; run train_splits.py first")
    if len(finished) < plan.n_models and not allow_partial:
        raise ConfigError(f"{store.folder} holds {len(finished)} of the plan's {plan.n_models} learners; finish it "
                          f"with train_splits.py or pass --allow_partial to use the {len(finished)}")
    k = len(finished)
    return {"model_ids": finished, "mask": plan.inclusion_mask[finished], "train": train[:, :k], "test": test[:, :k],
            "correct": correct[:, :k], "accuracy": np.stack(accuracy), "seconds": np.array(seconds)}


def per_boundary(mask: np.ndarray, train: np.ndarray, test: np.ndarray, tasks: np.ndarray, test_tasks: np.ndarray,
                 topk: int, threshold: float) -> dict:
    """Memorization [T, n] with its standard error, and the influence top-k [T, m, topk], of the examples seen
    by each boundary (NaN, -1 elsewhere); the last boundary's full influence result."""
    n_tasks, n, m = train.shape[0], train.shape[2], test.shape[2]
    mem = np.full((n_tasks, n), np.nan, np.float32)
    se = np.full((n_tasks, n), np.nan, np.float32)
    topk_index = np.full((n_tasks, m, topk), -1, np.int64)
    topk_value = np.full((n_tasks, m, topk), np.nan, np.float32)
    last = None
    for t in range(n_tasks):
        rows, cols = np.flatnonzero(tasks <= t), np.flatnonzero(test_tasks <= t)
        result = memorization(mask[:, rows], train[t][:, rows])
        mem[t, rows], se[t, rows] = result["mem"], result["se"]
        last = influence(mask[:, rows], test[t][:, cols], topk=topk, threshold=threshold)
        found = last["topk_index"] >= 0
        topk_index[t, cols] = np.where(found, rows[np.maximum(last["topk_index"], 0)], -1)
        topk_value[t, cols] = np.where(found, last["topk_value"], np.nan)
        last |= {"rows": rows, "cols": cols}
    return {"mem": mem, "se": se, "topk_index": topk_index, "topk_value": topk_value, "last": last}


def forgetting_by_memorization(mask: np.ndarray, correct: np.ndarray, mem: np.ndarray, tasks: np.ndarray,
                               high: float, low: float = LOW_MEM) -> dict:
    """Per example: accuracy over the learners with it at the end of its own task, at the end of the stream, and
    their difference (forgetting); memorization at the end of its own task. Compared between high- and
    low-memorization examples of every task but the last (which nothing follows)."""
    from scipy.stats import spearmanr, ttest_ind

    n_tasks = correct.shape[0]
    n = mask.shape[1]
    n_in = mask.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = (correct * mask[None]).sum(1) / n_in  # [T, n]: over the learners that trained on each example
    own = accuracy[tasks, np.arange(n)]
    forgetting = (own - accuracy[-1]).astype(np.float32)
    mem_own = mem[tasks, np.arange(n)]
    earlier = (tasks < n_tasks - 1) & np.isfinite(mem_own) & np.isfinite(forgetting)
    is_high, is_low = earlier & (mem_own >= high), earlier & (mem_own < low)
    result = {"forgetting": forgetting, "mem_own": mem_own.astype(np.float32), "accuracy_own": own,
              "accuracy_final": accuracy[-1], "earlier": earlier}
    summary = {"forgetting_high_mem": float(forgetting[is_high].mean()) if is_high.any() else float("nan"),
               "forgetting_low_mem": float(forgetting[is_low].mean()) if is_low.any() else float("nan"),
               "n_high_mem": int(is_high.sum()), "n_low_mem": int(is_low.sum())}
    summary["forgetting_gap"] = summary["forgetting_high_mem"] - summary["forgetting_low_mem"]
    if is_high.sum() > 1 and is_low.sum() > 1:
        summary["forgetting_gap_p"] = float(ttest_ind(forgetting[is_high], forgetting[is_low], equal_var=False).pvalue)
    if earlier.sum() > 2:
        summary["spearman_mem_forgetting"] = float(spearmanr(mem_own[earlier], forgetting[earlier]).statistic)
    result["summary"] = summary
    return result


def task_means(mem: np.ndarray, tasks: np.ndarray) -> np.ndarray:
    """[T, T]: mean memorization of task j's examples at the end of task t (NaN for j > t)."""
    n_tasks = mem.shape[0]
    out = np.full((n_tasks, n_tasks), np.nan)
    for t in range(n_tasks):
        for j in range(t + 1):
            values = mem[t, tasks == j]
            out[t, j] = np.nanmean(values) if np.isfinite(values).any() else np.nan
    return out


def score_stream_store(args: argparse.Namespace, store: SubsetStore, plan: Plan):
    """The stream plan's files, summary and per-boundary series; the arguments of eval_driver.log_to_mlflow."""
    from memorization.stream_report import write_stream_report

    data = read_stream_store(store, plan, args.target, args.allow_partial)
    dataset = stream_dataset(plan, args.data_path)
    tasks, test_tasks = example_tasks(dataset), (dataset.test.labels.numpy() // dataset.classes_per_task)
    out = Path(args.out)
    stem = out.with_suffix("")
    boundaries = per_boundary(data["mask"], data["train"], data["test"], tasks, test_tasks, args.influence_topk,
                              args.influence_threshold)
    mem = boundaries["mem"]
    # Everything that can refuse the evaluation runs before the first file is written.
    spearman_with_compare = compare_with(args.compare, mem[-1]) if args.compare else None
    if args.proxies:
        from memorization.proxy_eval import check_proxy_models

        check_proxy_models(len(data["model_ids"]), args.proxy_models)
    forgetting = forgetting_by_memorization(data["mask"], data["correct"], mem, tasks, args.mem_threshold)
    means = task_means(mem, tasks)
    n_in = data["mask"].sum(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = {"tasks": f"{stem.name}_tasks.npy", "tasks_se": f"{stem.name}_tasks_se.npy",
             "own_task": f"{stem.name}_own_task.npy", "forgetting": f"{stem.name}_forgetting.npy",
             "se": f"{stem.name}_se.npy", "n_in": f"{stem.name}_n_in.npy", "n_out": f"{stem.name}_n_out.npy",
             "influence": f"{stem.name}_influence.npz", "influence_tasks": f"{stem.name}_influence_tasks.npz"}
    np.save(out.parent / files["tasks"], mem)
    np.save(out.parent / files["tasks_se"], boundaries["se"])
    np.save(out.parent / files["own_task"], forgetting["mem_own"])
    np.save(out.parent / files["forgetting"], forgetting["forgetting"])
    np.save(out.parent / files["se"], boundaries["se"][-1])
    np.save(out.parent / files["n_in"], counts_in_dataset_order(n_in, plan.train_indices, len(n_in)))
    np.save(out.parent / files["n_out"], counts_in_dataset_order(len(data["mask"]) - n_in, plan.train_indices,
                                                                 len(n_in)))
    last = boundaries["last"]
    np.savez(out.parent / files["influence"], topk_index=boundaries["topk_index"][-1],
             topk_value=boundaries["topk_value"][-1], pair_train=last["rows"][last["pair_train"]],
             pair_test=last["cols"][last["pair_test"]], pair_value=last["pair_value"], histogram=last["histogram"],
             bins=np.linspace(-1, 1, 81))
    np.savez(out.parent / files["influence_tasks"], topk_index=boundaries["topk_index"],
             topk_value=boundaries["topk_value"], test_task=test_tasks)
    final = mem[-1]
    defined = np.isfinite(final)
    summary = {"n_models": len(data["model_ids"]), "n_models_planned": plan.n_models, "n_tasks": len(mem),
               "n_undefined": int((~defined).sum()), "mean": float(np.nanmean(final)),
               "mean_own_task": float(np.nanmean(forgetting["mem_own"])),
               "fraction_memorized": float(np.mean(final[defined] >= args.mem_threshold)),
               "learner_seconds_mean": float(np.nanmean(data["seconds"])) if np.isfinite(data["seconds"]).any()
               else float("nan"),
               "final_accuracy_mean": float(np.nanmean(data["accuracy"][:, -1]))} | forgetting["summary"]
    if spearman_with_compare is not None:
        summary["spearman_with_compare"] = spearman_with_compare
    if plan.noisy_mask.any():
        summary["auroc_relabeled"] = auroc(final, plan.noisy_mask)
        summary["auroc_relabeled_own_task"] = auroc(forgetting["mem_own"], plan.noisy_mask)
    known = dataset.known_answer()
    if known is not None:
        summary["auroc_singleton"] = auroc(final, known["singleton"])
        summary["auroc_singleton_own_task"] = auroc(forgetting["mem_own"], known["singleton"])
    proxies = None
    if args.proxies:
        from memorization.proxy_eval import score_stream_proxies

        proxies = score_stream_proxies(store, plan, data, tasks, args, plan.noisy_mask if plan.noisy_mask.any()
                                       else None, None if known is None else known["singleton"], stem)
        summary.update(proxies["summary"])
    series = {"stream/mem_mean": [float(np.nanmean(row)) for row in mem],
              "stream/mem_new_task": [float(means[t, t]) for t in range(len(mem))],
              "stream/fraction_memorized": [float(np.mean(row[np.isfinite(row)] >= args.mem_threshold))
                                            for row in mem],
              "stream/accuracy_class_il": [float(np.nanmean(data["accuracy"][:, t, :t + 1])) for t in range(len(mem))]}
    sidecar = {"estimator": "stream", "dataset": plan.settings["dataset"], "n": int(len(final)),
               "label_fingerprint": plan.settings["label_fingerprint"], "label_noise": plan.settings["label_noise"],
               "seed": plan.settings["seed"], "plan_hash": plan.hash, "n_models": len(data["model_ids"]),
               "n_models_planned": plan.n_models, "subset_ratios": plan.settings["subset_ratios"],
               "target": args.target, "point": f"end of task {len(mem)} of {len(mem)} (the stream's end)",
               "n_undefined": summary["n_undefined"], "files": files}
    save_scores(out, final, sidecar)
    report = write_stream_report(Path(f"{stem}_report"), mem=mem, means=means, forgetting=forgetting,
                                 summary=summary, series=series, args=args, low=LOW_MEM,
                                 sections=["", "## Memorization proxies of one continual run", "", proxies["table"]]
                                 if proxies else [])
    print(f"{out}: in-stream memorization of {int(defined.sum())} examples at {len(mem)} task boundaries from "
          f"{len(data['model_ids'])} learners")
    for key, value in summary.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    paths = [out, Path(f"{stem}.json"), *(out.parent / f for f in files.values()), *(proxies["files"] if proxies else [])]
    result = {"scores": final, "summary": summary, "mem_tasks": mem, "forgetting": forgetting, "series": series,
              "boundaries": boundaries}
    return result, summary, sidecar, paths, report
