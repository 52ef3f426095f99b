"""The subset-training driver: write the plan into the store, then train the missing models on a launcher.

Each job is one group of models (trained as one ensemble when --ensemble > 1); every finished model is
written to the store at once, so a killed run resumes where it stopped. Only this process writes to MLflow.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from backbones import BACKBONES, FLAGS_ADDED
from datasets import DATASETS
from utils.claims import Claims, driver_gone
from memorization.plan import (
    Plan,
    balanced_masks,
    fingerprint,
    loo_masks,
    random_masks,
    stratified_masks,
)
from memorization.store import SubsetStore
from memorization.training import (
    RECIPE_DEFAULTS,
    class_rows,
    dataset_args,
    train_and_store,
)
from utils.errors import ConfigError
from utils.launchers import check_launcher, run_jobs
from utils.mlflow_logger import RunLogger, default_tracking_uri, environment_tags
from utils.registry import declared_flags


def loo_example_indices(spec: str, train_indices: np.ndarray, n_total: int, args: argparse.Namespace) -> np.ndarray:
    """The training examples a leave-one-out plan leaves out, as sorted dataset indices, from --loo_examples:
    'random:N' (N of the plan's examples, drawn with --seed), indices and ranges such as '0-99,512', or a
    .npy / text file of indices."""
    spec = str(spec).strip()
    where = f"--loo_examples {spec}"
    if spec.startswith("random:"):
        try:
            count = int(spec.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"{where}: 'random:N' takes a whole number N, e.g. random:300") from None
        if not 1 <= count <= len(train_indices):
            raise ConfigError(f"{where} asks for {count} examples but the plan has {len(train_indices)} training "
                              f"examples; pass 1 ≤ N ≤ {len(train_indices)}")
        rng = np.random.default_rng([args.seed, 8])
        return np.sort(train_indices[rng.choice(len(train_indices), count, replace=False)]).astype(np.int64)
    if Path(spec).suffix in (".npy", ".txt") or Path(spec).is_file():
        try:
            values = np.load(spec, allow_pickle=False) if spec.endswith(".npy") else np.loadtxt(spec, ndmin=1)
        except (OSError, ValueError) as error:
            raise ConfigError(f"{where} is not a readable file of example indices ({type(error).__name__}); pass "
                              f"a .npy or text file of whole numbers") from None
        values = np.asarray(values).ravel()
        if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise ConfigError(f"{where} must hold whole-number example indices (and at least one)")
        chosen = values.astype(np.int64)
    else:
        chosen = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            try:
                a, _, b = part.partition("-")
                chosen += list(range(int(a), int(b) + 1)) if b else [int(a)]
            except ValueError:
                raise ConfigError(f"{where}: {part!r} is neither an index nor a range a-b; pass e.g. "
                                  f"'0-99,512', random:300 or a .npy file") from None
        chosen = np.asarray(chosen, dtype=np.int64)
        if chosen.size == 0:
            raise ConfigError(f"{where} names no example; pass e.g. '0-99', random:300 or a .npy file")
    outside = chosen[(chosen < 0) | (chosen >= n_total)]
    if outside.size:
        raise ConfigError(f"{where} names example {int(outside[0])}, out of range: {args.dataset}'s training set "
                          f"has examples 0..{n_total - 1}")
    excluded = chosen[~np.isin(chosen, train_indices)]
    if excluded.size:
        raise ConfigError(f"{where} names example {int(excluded[0])}, which --classes {args.classes[0]},"
                          f"{args.classes[1]} leaves out of the plan; pick examples of those classes")
    unique, counts = np.unique(chosen, return_counts=True)
    if (counts > 1).any():
        raise ConfigError(f"{where} names example {int(unique[counts > 1][0])} twice; list each example once")
    return unique


def make_plan(args: argparse.Namespace) -> Plan:
    """Everything that determines the stored predictions, derived deterministically from the arguments."""
    if args.plan_kind == "stream":
        raise ValueError("a stream plan is made by continual.stream_plan.make_stream_plan (train_splits.py's run_plan)")
    dataset = DATASETS.get(args.dataset)(dataset_args(vars(args), args.data_path, "cpu",
                                                      args.download))
    if args.classes is not None and args.classes[1] > dataset.N_CLASSES:
        raise ConfigError(f"--classes {args.classes[0]},{args.classes[1]} exceeds {args.dataset}'s "
                          f"{dataset.N_CLASSES} classes")
    labels = dataset.train.labels.numpy()
    train_indices = class_rows(labels, args.classes)
    n = len(train_indices)
    if args.plan_kind == "loo":
        loo_examples = loo_example_indices(args.loo_examples, train_indices, len(labels), args)
        masks, seed_index = loo_masks(n, np.searchsorted(train_indices, loo_examples), args.loo_seeds)
        model_ratio = masks.mean(1)  # 1 for the full models, (n - 1) / n for the others: separate groups
        model_seed = np.random.default_rng([args.seed, 6]).integers(0, 2**31 - 1, args.loo_seeds)[seed_index]
    else:
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
    # A backbone flag added after the first stores is recorded only where it differs from what they were built with
    # (FLAGS_ADDED), so their plans keep their hash; the backbone reads that value when the flag is absent.
    backbone_args = {dest: getattr(args, dest) for dest in declared_flags(BACKBONES.get(args.backbone))
                     if FLAGS_ADDED.get(dest, object()) != getattr(args, dest)}
    settings = {
        "dataset": args.dataset, "classes": args.classes, "n_train": n, "n_train_total": len(labels),
        "n_test": len(class_rows(dataset.test.labels.numpy(), args.classes)),
        "label_fingerprint": fingerprint(labels), "seed": args.seed,
        "label_noise": args.label_noise, "input_noise": args.input_noise,
        "backbone": args.backbone, "backbone_args": backbone_args,
        "training": {"n_epochs": args.n_epochs, "lr": args.lr, "batch_size": args.batch_size,
                     "optimizer": args.optimizer, "optim_wd": args.optim_wd, "optim_mom": args.optim_mom,
                     "optim_eps": args.optim_eps, "record_epochs": args.record_epochs,
                     "save_logits": args.save_logits},
    }
    if args.plan_kind == "loo":
        settings.update({"kind": "loo", "loo_examples": loo_examples.tolist(), "loo_seeds": args.loo_seeds})
    else:  # the keys of a subset plan, unchanged since the first stores (their hash depends on them)
        settings.update({"subset_ratios": args.ratios, "n_models_per_ratio": args.n_models,
                         "mask_sampling": args.split_sampling})
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


def split_run_name(settings: dict) -> str:
    """What a split-training run is, readable in the MLflow run list: splits-seq-digits-mlp-16x0.5-s0 (16 models
    per subset ratio 0.5, plan seed 0), loo-seq-digits-mlp-300ex-4seeds-s0 for leave-one-out plans, with the class
    range and the label noise when the plan has them; stream-seq-digits-er-mlp-16x0.5-s0 for stream plans."""
    if settings.get("kind") == "stream":
        parts = ["stream", settings["dataset"], settings["continual"]["model"], settings["backbone"],
                 f"{settings['n_models_per_ratio']}x{settings['subset_ratios'][0]:g}"]
        return "-".join(parts + ([f"noise{settings['label_noise']:g}"] if settings["label_noise"] else [])
                        + [f"s{settings['seed']}"])
    parts = ["loo" if settings.get("kind") == "loo" else "splits", settings["dataset"]]
    if settings["classes"] is not None:
        parts.append("classes{}-{}".format(*settings["classes"]))
    parts.append(settings["backbone"])
    if settings.get("kind") == "loo":
        parts += [f"{len(settings['loo_examples'])}ex", f"{settings['loo_seeds']}seeds"]
    else:
        parts.append(f"{settings['n_models_per_ratio']}x" + "+".join(f"{r:g}" for r in settings["subset_ratios"]))
    if settings["label_noise"]:
        parts.append(f"noise{settings['label_noise']:g}")
    return "-".join(parts + [f"s{settings['seed']}"])


def log_plan_dataset(logger: RunLogger, settings: dict, data_path: str, context: str) -> None:
    """The plan's dataset as the run's MLflow dataset input, identified by its label fingerprint (the digest a score
    file's sidecar and main.py's runs of the same labels carry)."""
    logger.log_dataset(settings["dataset"], settings["label_fingerprint"],
                       DATASETS.get(settings["dataset"]).source(data_path), context)


def open_mlflow_run(store: SubsetStore, plan: Plan, args: argparse.Namespace, claims: Claims) -> RunLogger | None:
    """This driver's MLflow run: the run of a driver of this store that died (killed with -9, or stopped),
    continued, or a new one. Each live driver has its own run; its file in `drivers/` is touched while
    it works, so an untouched file marks a run nobody continues."""
    tracking_uri = args.tracking_uri or default_tracking_uri()
    if args.chunk and tracking_uri.startswith("sqlite"):
        print("chunk runs do not write to a SQLite MLflow store (one writer only); eval_splits.py logs the store")
        return None
    folder = store.folder / "drivers"
    folder.mkdir(exist_ok=True)
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        stale = time.time() - path.stat().st_mtime > args.claim_timeout or driver_gone(record.get("driver", ""))
        if record.get("tracking_uri") != tracking_uri or not stale:
            continue
        try:  # one driver only adopts it
            os.rename(path, path.with_suffix(".adopted"))
        except FileNotFoundError:
            continue
        path.with_suffix(".adopted").unlink()
        logger = RunLogger(tracking_uri, args.experiment_name, args.run_name, run_id=record["run_id"])
        print(f"continuing MLflow run {logger.run_id} of a driver that stopped", flush=True)
        break
    else:
        logger = RunLogger(tracking_uri, args.experiment_name, args.run_name or split_run_name(plan.settings))
        logger.log_params({k: v for k, v in plan.settings.items()
                           if k not in ("training", "grouping", "loo_examples", "continual", "continual_argv")}
                          | {f"learner/{k}": v for k, v in plan.settings.get("continual", {}).items()}
                          | ({"n_loo_examples": len(plan.settings["loo_examples"])} if "loo_examples" in plan.settings
                             else {})
                          | plan.settings["training"] | plan.settings.get("grouping", {})
                          | {"plan_hash": plan.hash, "out": str(Path(args.out).resolve())})
        logger.set_tags(environment_tags(args.device))
        log_plan_dataset(logger, plan.settings, args.data_path, "training")
        logger.log_artifact(str(store.folder / "plan.json"))
    record_path = folder / f"{logger.run_id}.json"
    record_path.write_text(json.dumps({"tracking_uri": tracking_uri, "run_id": logger.run_id, "driver": claims.driver}))
    claims.keep_fresh(record_path)
    return logger


def run_plan(args: argparse.Namespace, make=make_plan, job=train_and_store) -> dict:
    """Write the plan into the store, then train this chunk's missing groups on the chosen launcher,
    claiming each group first so that drivers sharing the store train different groups. `make(args)` makes the
    plan and `job(store, model_ids, data_path, device)` trains a group: a stream plan's come from
    continual/stream_plan.py (train_splits.py passes them)."""
    check_launcher(args)
    store = SubsetStore(args.out)
    plan = make(args)
    store.write_plan(plan, replace_plan=args.replace_plan)
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
    claims = Claims(store.folder, plan.hash, args.claim_timeout)
    for path in claims.clean_leftovers() + store.clean_leftovers(args.claim_timeout):
        print(f"removed {path.relative_to(store.folder)}, left by a driver that was killed", flush=True)
    # A store with nothing left to train gets no new MLflow run: a rerun of a finished store adds none.
    logger = open_mlflow_run(store, plan, args, claims) if n_todo else None
    index = {group[0]: i for i, group in enumerate(plan.groups)}
    n_epochs = plan.progress_units
    started, done, stored, running, elsewhere = time.perf_counter(), 0, set(finished), {}, []

    def jobs():
        for group in groups:
            if not claims.claim(index[group[0]]):
                elsewhere.append(group)  # another live driver trains it
                continue
            if all(store.is_stored(m, plan) for m in group):  # finished by another driver meanwhile
                claims.release(index[group[0]])
                continue
            running[group[0]] = group
            yield (str(store.folder), group, args.data_path, args.device)

    bar = tqdm(total=n_todo * n_epochs, unit="model-task" if plan.kind == "stream" else "model-epoch", disable=args.non_verbose, dynamic_ncols=True)

    def show_progress():
        bar.n = done * n_epochs + sum(store.read_progress(first) * len(g) for first, g in running.items())
        bar.refresh()

    try:
        for result in run_jobs(job, jobs(), args, store.folder / "slurm", poll=show_progress):
            group = running.pop(result["model_ids"][0])
            claims.release(index[group[0]])
            done += len(group)
            stored.update(group)
            per_hour = done / (time.perf_counter() - started) * 3600
            left = plan.n_models - len(stored)
            if done == len(group):  # the first group: what the rest will cost
                tqdm.write(f"first group: {per_hour:.0f} models/hour; the {left} models left need about "
                           f"{left / per_hour:.2f} hours at this rate (one driver)")
            show_progress()
            bar.set_postfix(models_per_hour=f"{per_hour:.0f}", hours_left=f"{left / per_hour:.2f}")
            if logger:
                logger.log_metrics({"models_stored": len(stored), "models_per_hour": per_hour,
                                    "hours_left": left / per_hour,
                                    "seconds_per_model": result["seconds"] / len(group)}, step=len(stored))
    except BaseException:
        if logger:
            logger.finish("KILLED" if not isinstance(sys.exc_info()[1], Exception) else "FAILED")
            record = store.folder / "drivers" / f"{logger.run_id}.json"
            claims.close()  # no touch may follow the one below
            if record.exists():
                os.utime(record, (0, 0))  # stopped: the next driver continues this run at once
        raise
    finally:
        bar.close()
        for first in list(running):  # unfinished groups: free for other drivers now
            claims.release(index[first])
        claims.close()
    elapsed = time.perf_counter() - started
    elsewhere = [g for g in elsewhere if not all(store.is_stored(m, plan) for m in g)]  # still unfinished
    held = len(store.stored_models() & set(range(plan.n_models)))  # other drivers' models included
    if logger:
        logger.log_metrics({"train_seconds_total": elapsed, "models_stored": held,
                            "hours_left": 0.0 if held == plan.n_models else float("nan")}, step=held)
        logger.finish()
        (store.folder / "drivers" / f"{logger.run_id}.json").unlink(missing_ok=True)
    print(f"trained {done} models in {elapsed:.1f} s; the store holds {held} of {plan.n_models}")
    if elsewhere:
        print(f"{sum(map(len, elsewhere))} models are being trained by another driver of this store; rerun to "
              f"take over those whose driver stops for {args.claim_timeout:.0f} s")
    if logger:
        print("\n" + logger.where_to_look("split training"), flush=True)
    return {"trained": done, "seconds": elapsed, "elsewhere": sum(map(len, elsewhere))}
