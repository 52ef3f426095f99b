"""The subset-training driver: write the plan into the store, then train the missing models on a launcher.

Each job is one group of models (trained as one ensemble when --ensemble > 1); every finished model is
written to the store at once, so a killed run resumes where it stopped. Only this process writes to MLflow.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from backbones import BACKBONES
from datasets import DATASETS
from memorization.plan import Plan, balanced_masks, fingerprint, random_masks, stratified_masks
from memorization.store import SubsetStore
from memorization.training import RECIPE_DEFAULTS, class_rows, dataset_args, train_and_store
from utils.errors import ConfigError
from utils.launchers import run_jobs
from utils.mlflow_logger import RunLogger, default_tracking_uri, environment_tags
from utils.registry import declared_flags


def make_plan(args: argparse.Namespace) -> Plan:
    """Everything that determines the stored predictions, derived deterministically from the arguments."""
    dataset = DATASETS.get(args.dataset)(dataset_args(vars(args), args.data_path, "cpu",
                                                      args.download))
    if args.classes is not None and args.classes[1] > dataset.N_CLASSES:
        raise ConfigError(f"--classes {args.classes[0]},{args.classes[1]} exceeds {args.dataset}'s "
                          f"{dataset.N_CLASSES} classes")
    labels = dataset.train.labels.numpy()
    train_indices = class_rows(labels, args.classes)
    n = len(train_indices)
    rng = np.random.default_rng([args.seed, 5])
    if args.split_sampling == "stratified":
        masks = np.concatenate([stratified_masks(labels[train_indices], ratio, args.n_models, rng)
                                for ratio in args.ratios])
    else:
        sample = balanced_masks if args.split_sampling == "balanced" else random_masks
        masks = np.concatenate([sample(n, ratio, args.n_models, rng) for ratio in args.ratios])
    model_ratio = np.repeat(np.array(args.ratios, dtype=np.float64), args.n_models)
    model_seed = np.random.default_rng([args.seed, 6]).integers(0, 2**31 - 1, len(masks))
    input_noise = np.zeros(len(labels), dtype=bool)
    input_noise[np.random.default_rng([args.seed, 4]).permutation(len(labels))[:round(args.input_noise * len(labels))]] = True
    backbone_args = {dest: getattr(args, dest) for dest in declared_flags(BACKBONES.get(args.backbone))}
    settings = {
        "dataset": args.dataset, "classes": args.classes, "n_train": n, "n_train_total": len(labels),
        "n_test": len(class_rows(dataset.test.labels.numpy(), args.classes)),
        "label_fingerprint": fingerprint(labels), "subset_ratios": args.ratios,
        "n_models_per_ratio": args.n_models, "mask_sampling": args.split_sampling, "seed": args.seed,
        "label_noise": args.label_noise, "input_noise": args.input_noise,
        "backbone": args.backbone, "backbone_args": backbone_args,
        "training": {"n_epochs": args.n_epochs, "lr": args.lr, "batch_size": args.batch_size,
                     "optimizer": args.optimizer, "optim_wd": args.optim_wd, "optim_mom": args.optim_mom,
                     "optim_eps": args.optim_eps, "record_epochs": args.record_epochs,
                     "save_logits": args.save_logits},
    }
    # Settings added later are recorded only where they differ from what earlier plans trained with,
    # so a store made before them keeps its hash.
    settings["training"].update({k: getattr(args, k) for k, v in RECIPE_DEFAULTS.items() if getattr(args, k) != v})
    if (args.ensemble, args.cpu_threads) != (1, 1):
        settings["grouping"] = {"size": args.ensemble, "cpu_threads": args.cpu_threads}
    return Plan(settings, masks, model_ratio, model_seed, train_indices.astype(np.int64), dataset.noisy_mask,
                input_noise)


def groups_to_train(plan: Plan, finished: list[int], args: argparse.Namespace) -> list[list[int]]:
    """The plan's groups in this chunk that miss a model. A group is trained whole, so a model lost from a
    group (a kill between its files, a damaged file) is retrained with the same companions: same bits."""
    groups = plan.groups
    chunk = np.array_split(np.arange(len(groups)), args.chunk_count)[args.chunk_index]
    done = set(finished)
    return [groups[g] for g in chunk.tolist() if not done.issuperset(groups[g])]


def run_plan(args: argparse.Namespace) -> dict:
    """Write the plan into the store, then train this chunk's missing models on the chosen launcher."""
    store = SubsetStore(args.out)
    plan = make_plan(args)
    store.write_plan(plan)
    finished, problems = store.finished_models(plan, repair=True)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    groups = groups_to_train(plan, finished, args)
    n_todo = sum(len(g) for g in groups)
    retrained = n_todo - len(set().union(*map(set, groups)) - set(finished)) if groups else 0
    if retrained:
        print(f"{retrained} stored models share a group with a missing one and are trained again with it "
              f"(the same bits on the CPU)", flush=True)
    print(f"{args.out}: {plan.n_models} models planned, {len(finished)} stored, {n_todo} to train"
          + (f" in chunk {args.chunk_index}/{args.chunk_count}" if args.chunk else ""), flush=True)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    logger = None
    if args.chunk and tracking_uri.startswith("sqlite"):
        print("chunk runs do not write to a SQLite MLflow store (one writer only); eval_splits.py logs the store")
    else:
        logger = RunLogger(tracking_uri, args.experiment_name, args.run_name)
        logger.log_params({k: v for k, v in plan.settings.items() if k != "training"} | plan.settings["training"]
                          | {"plan_hash": plan.hash, "out": str(Path(args.out).resolve()), "launcher": args.launcher,
                             "ensemble": args.ensemble, "device": args.device})
        logger.set_tags(environment_tags(args.device))
        logger.log_artifact(str(store.folder / "plan.json"))
    jobs = [(str(store.folder), group, args.data_path, args.device) for group in groups]
    started, done, stored = time.perf_counter(), 0, set(finished)
    bar = tqdm(total=n_todo, unit="model", disable=args.non_verbose, dynamic_ncols=True)
    try:
        for result in run_jobs(train_and_store, jobs, args, store.folder / "slurm"):
            done += len(result["model_ids"])
            stored.update(result["model_ids"])
            per_hour = done / (time.perf_counter() - started) * 3600
            if done == len(result["model_ids"]):  # the first group: what the rest will cost
                left = n_todo - done
                tqdm.write(f"first group: {per_hour:.0f} models/hour; the {left} models left need about "
                           f"{left / per_hour:.2f} hours at this rate")
            bar.update(len(result["model_ids"]))
            bar.set_postfix(models_per_hour=f"{per_hour:.0f}")
            if logger:
                logger.log_metrics({"models_stored": len(stored), "models_per_hour": per_hour,
                                    "seconds_per_model": result["seconds"] / len(result["model_ids"])}, step=done)
    except BaseException:
        if logger:
            logger.finish("KILLED" if not isinstance(sys.exc_info()[1], Exception) else "FAILED")
        raise
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    if logger:
        logger.log_metrics({"train_seconds_total": elapsed}, step=done)
        logger.finish()
    print(f"trained {done} models in {elapsed:.1f} s; the store holds {len(stored)} of {plan.n_models}")
    return {"trained": done, "seconds": elapsed}
