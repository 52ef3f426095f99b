"""Scoring a subset-training store: memorization, influence and consistency files, a report, an MLflow run."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from memorization.attribution_eval import hold_out, held_out_store, loo_store_of, requested, score_attribution
from memorization.datamodels import check_enough_models, stored_margin, write_datamodels
from memorization.estimator import auroc, consistency_scores, influence, memorization
from memorization.forgetting import write_pooled_scores
from memorization.loo import score_loo_store
from memorization.proxy_eval import check_proxy_models, score_proxies
from memorization.plan import is_loo
from memorization.released_runs import find_released_runs, read_released_runs
from memorization.report import write_report
from memorization.driver import log_plan_dataset
from memorization.score_format import (
    array_digest,
    compare_with,
    counts_in_dataset_order,
    in_dataset_order,
    record_score_run,
    save_scores,
)
from memorization.scores_per_epoch_and_ratio import write_score_files
from memorization.store import CorruptModelFile, SubsetStore
from memorization.training import load_plan_data
from utils.errors import ConfigError
from utils.mlflow_logger import (
    RunLogger,
    check_reachable,
    default_tracking_uri,
    environment_tags,
)


def load_store(store: SubsetStore, plan, args: argparse.Namespace) -> dict:
    """Masks and targets of every readable model, as float32 matrices [epochs, models, examples]; one read each."""
    run_dir = store.folder
    stored = sorted(i for i in store.stored_models() if i < plan.n_models)
    n, m = plan.inclusion_mask.shape[1], plan.settings["n_test"]
    epochs = plan.settings["training"]["record_epochs"]
    arrays = {key: np.zeros((len(epochs), len(stored), size), dtype=np.float32)
              for key, size in (("prob_train", n), ("correct_train", n), ("prob_test", m), ("correct_test", m))}
    finished = []
    kind = "logits" if plan.settings["training"].get("save_logits") else "prob"
    margin = np.zeros((len(stored), m), np.float32) if getattr(args, "datamodels", False) else None
    plan_data = load_plan_data(plan, args.data_path, "cpu") if margin is not None and kind == "logits" else None
    labels = None if plan_data is None else plan_data.test_labels.numpy()
    for model_id in stored:
        try:
            model = store.read_model(model_id, plan)
            if margin is not None:  # the datamodels' target, one [m] row per model instead of all logits
                margin[len(finished)] = stored_margin(model, kind, labels)
        except CorruptModelFile as error:
            print(f"warning: {error} (not used; train_splits.py retrains it)", file=sys.stderr)
            continue
        for key in arrays:
            arrays[key][:, len(finished)] = model[key]
        finished.append(model_id)
    if not finished:
        raise ConfigError(f"{run_dir} holds no finished model yet; run train_splits.py first")
    if len(finished) < plan.n_models and not args.allow_partial:
        raise ConfigError(f"{run_dir} holds {len(finished)} of the plan's {plan.n_models} models; finish it with "
                          f"train_splits.py or pass --allow_partial to use the {len(finished)}")
    arrays = {key: value[:, :len(finished)] for key, value in arrays.items()}
    if margin is not None:
        check_enough_models(len(finished), args.datamodel_val_fraction)
    return {"plan": plan, "model_ids": finished, "mask": plan.inclusion_mask[finished], "epochs": epochs,
            "ratio": plan.model_ratio[finished], "train": arrays[f"{args.target}_train"],
            "test": arrays[f"{args.target}_test"], "prob_train": arrays["prob_train"],
            "correct_train": arrays["correct_train"], "correct_test": arrays["correct_test"],
            "margin": None if margin is None else margin[:len(finished)], "margin_kind": kind,
            "plan_data": plan_data}


def refuse_flags_the_store_cannot_use(args: argparse.Namespace, kind: str) -> None:
    """Flags of subset stores that a leave-one-out or stream store has no data for end the evaluation in one
    sentence instead of being ignored."""
    unusable = {"--influence_full": args.influence_full, "--lds_holdout": args.lds_holdout,
                "--lds_store": args.lds_store, "--loo_store": args.loo_store,
                # a leave-one-out store says itself why it has no datamodels (memorization/loo.py)
                **({"--proxies": args.proxies} if kind == "loo" else {"--datamodels": args.datamodels})}
    given = [flag for flag, value in unusable.items() if value]
    if given:
        what = ("a leave-one-out store has one model per left-out example and seed, not random subsets"
                if kind == "loo" else "a stream store's influence changes at every task boundary")
        raise ConfigError(f"{given[0]} scores subset stores, and {what}; drop it")


def load_released(run_dir: Path, args: argparse.Namespace) -> dict:
    if getattr(args, "datamodels", False):
        raise ConfigError("--datamodels needs each model's margin (probabilities or logits), and released "
                          "aux_arrays.npz runs hold 0/1 correctness only; leave out --datamodels for them")
    if args.target != "correct":
        raise ConfigError("released aux_arrays.npz files hold 0/1 correctness only; pass --target correct")
    runs = read_released_runs(run_dir)
    train, test = runs["train"][None], runs["test"][None]
    return {"plan": None, "model_ids": list(range(len(runs["mask"]))), "mask": runs["mask"], "epochs": [0],
            "ratio": runs["ratio"], "train": train, "test": test, "prob_train": None, "correct_train": train,
            "correct_test": test}


def score_store(args: argparse.Namespace) -> dict:
    """Scores, standard errors, counts, influence and consistency of a store, written beside --out and logged."""
    check_reachable(args.tracking_uri or default_tracking_uri())  # before the work, not after it
    started = time.time()  # the MLflow run is opened once the scores exist, and shows the evaluation's duration
    run_dir = Path(args.run_dir)
    if (run_dir / "plan.json").exists():
        store = SubsetStore(run_dir)
        plan = store.load_plan()  # read once: at full size its masks are gigabytes' worth of bools
        if is_loo(plan) or plan.kind == "stream":
            refuse_flags_the_store_cannot_use(args, plan.kind)
        if is_loo(plan):
            result, summary, sidecar, files, report = score_loo_store(args, store, plan)
            log_to_mlflow(args, result["scores"], plan, summary, sidecar, files, report, started)
            return result
        if plan.kind == "stream":
            from memorization.stream_eval import score_stream_store


            result, summary, sidecar, files, report = score_stream_store(args, store, plan)
            log_to_mlflow(args, result["scores"], plan, summary, sidecar, files, report, started, result["series"])
            return result
        data = load_store(store, plan, args)
        held = (hold_out(data, args.lds_holdout) if args.lds_holdout else
                held_out_store(args, plan, load_store) if args.lds_store else None)
        if args.loo_store:
            loo_store_of(args, plan)  # checked before the first file is written
        if args.proxies:
            check_proxy_models(len(data["model_ids"]), args.proxy_models)
    elif find_released_runs(run_dir):
        held = None
        if requested(args) or args.proxies:
            raise ConfigError("--lds_holdout, --lds_store, --loo_store and --proxies need a train_splits.py store "
                              "(released aux_arrays.npz runs hold correctness only)")
        data = load_released(run_dir, args)
    else:
        raise ConfigError(f"{run_dir} holds neither a train_splits.py store (plan.json) nor released "
                          f"aux_arrays.npz runs; pass the --out folder of train_splits.py")
    plan, mask = data["plan"], data["mask"]
    n_total = plan.settings["n_train_total"] if plan else mask.shape[1]
    rows = plan.train_indices if plan else np.arange(mask.shape[1])
    out = Path(args.out)
    stem = out.with_suffix("")
    final = memorization(mask, data["train"][-1])
    scores = in_dataset_order(final["mem"], rows, n_total)
    # Everything that can refuse the evaluation runs before the first file is written.
    spearman_with_compare = compare_with(args.compare, scores) if args.compare else None
    if plan is not None and data.get("plan_data") is None:
        data["plan_data"] = load_plan_data(plan, args.data_path, "cpu")  # the report's images: the data files now
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(f"{stem}_se.npy", in_dataset_order(final["se"], rows, n_total))
    np.save(f"{stem}_n_in.npy", counts_in_dataset_order(final["n_in"], rows, n_total))
    np.save(f"{stem}_n_out.npy", counts_in_dataset_order(final["n_out"], rows, n_total))
    full_path = Path(f"{stem}_influence_full.npy") if args.influence_full or requested(args) else None
    infl = influence(mask, data["test"][-1], topk=args.influence_topk, threshold=args.influence_threshold,
                     full_path=full_path)
    topk = np.where(infl["topk_index"] >= 0, rows[infl["topk_index"]], -1)  # -1: fewer influencers than k
    np.savez(f"{stem}_influence.npz", topk_index=topk, topk_value=infl["topk_value"],
             pair_train=rows[infl["pair_train"]], pair_test=infl["pair_test"], pair_value=infl["pair_value"],
             histogram=infl["histogram"], bins=infl["bins"] if "bins" in infl else np.linspace(-1, 1, 81))
    ratios = sorted(set(np.round(data["ratio"], 6).tolist()))
    if len(ratios) > 1:
        np.save(f"{stem}_cscore.npy", in_dataset_order(consistency_scores(mask, data["train"][-1],
                                                                          data["ratio"])["cscore"], rows, n_total))
    noisy = plan.noisy_mask[rows] if plan is not None else None
    summary = {"n_models": len(data["model_ids"]), "n_models_planned": plan.n_models if plan else len(mask),
               "n_undefined": int(final["n_undefined"]), "mean": float(np.nanmean(final["mem"])),
               "fraction_memorized": float(np.mean(final["mem"][np.isfinite(final["mem"])] >= args.mem_threshold)),
               "influence_pairs": int(len(infl["pair_value"]))}
    if noisy is not None and noisy.any():
        summary["auroc_relabeled"] = auroc(final["mem"], noisy)
    known = data["plan_data"].dataset.known_answer() if plan is not None else None
    singleton = None if known is None else known["singleton"][rows]
    if singleton is not None:
        summary["auroc_singleton"] = auroc(final["mem"], singleton)
    if spearman_with_compare is not None:
        summary["spearman_with_compare"] = spearman_with_compare
    proxies = None
    if args.proxies:
        if plan is None:
            raise ConfigError("--proxies reads the models' training records, which released aux_arrays.npz runs do "
                              "not hold; use a train_splits.py store")
        proxies = score_proxies(store, plan, data, args, noisy if noisy is not None and noisy.any() else None,
                                singleton, stem)
        summary.update(proxies["summary"])
        data.setdefault("sections", []).extend(["", "## Memorization proxies", "", proxies["table"]])
    forgetting = write_pooled_scores(run_dir, plan, data["model_ids"], mask, rows, n_total, stem, final["mem"]) \
        if plan is not None else None
    if forgetting is not None:
        summary["spearman_forgetting_mem"], data["forgetting"] = forgetting["spearman_with_mem"], forgetting["values"]
    datamodels = None if data.get("margin") is None else write_datamodels(
        Path(f"{stem}_datamodels.npz"), mask, data["margin"], data["margin_kind"], rows, data["model_ids"],
        args.datamodel_val_fraction, args.datamodel_alphas, args.influence_topk, plan.settings["seed"])
    if datamodels is not None:
        summary.update(datamodels["summary"])
        data["datamodels"] = datamodels["report"]
    else:  # an earlier evaluation's fit would otherwise sit beside scores it was not made with
        Path(f"{stem}_datamodels.npz").unlink(missing_ok=True)
    if requested(args):
        scored, lines = score_attribution(args, plan, held, full_path, datamodels["path"] if datamodels else None)
        summary.update(scored)
        data.setdefault("sections", []).extend(lines)
        if not args.influence_full:
            full_path.unlink()  # written for the scores only: it can be gigabytes
    sidecar = {"dataset": plan.settings["dataset"] if plan else None, "n": int(n_total),
               "label_fingerprint": plan.settings["label_fingerprint"] if plan else None,
               "label_noise": plan.settings["label_noise"] if plan else None,
               "seed": plan.settings["seed"] if plan else None,
               "plan_hash": plan.hash if plan else None, "n_models": len(data["model_ids"]),
               "n_models_planned": summary["n_models_planned"], "subset_ratios": ratios, "target": args.target,
               "n_undefined": summary["n_undefined"], "files": {
                   "se": f"{stem.name}_se.npy", "n_in": f"{stem.name}_n_in.npy", "n_out": f"{stem.name}_n_out.npy",
                   "influence": f"{stem.name}_influence.npz"}}
    if datamodels is not None:
        sidecar["files"]["datamodels"], sidecar["datamodel_margin"] = datamodels["path"].name, data["margin_kind"]
    more_files = write_score_files(stem, data, infl, rows, n_total, args.influence_topk, sidecar)
    save_scores(out, scores, sidecar)  # last: the pair replaces an earlier evaluation's only once all is written
    print(f"{out}: memorization of {len(rows)} examples from {len(data['model_ids'])} models; "
          f"{summary['n_undefined']} undefined (never left out or never included) are NaN")
    for key, value in summary.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    report = write_report_for(data, final, infl, noisy, args, Path(f"{stem}_report"), summary)
    log_to_mlflow(args, scores, plan, summary, sidecar, [out, Path(f"{stem}.json"), *more_files,
                                                          *(forgetting["files"] if forgetting else []),
                                                          *(proxies["files"] if proxies else []),
                                                          *([datamodels["path"]] if datamodels else [])],
                  report, started)
    return {"scores": scores, "summary": summary, "memorization": final, "influence": infl}


def write_report_for(data: dict, final: dict, infl: dict, noisy, args, folder: Path, summary: dict) -> list[Path]:
    plan = data["plan"]
    images = labels = test_images = test_labels = None
    if plan is not None:
        plan_data = data.get("plan_data") or load_plan_data(plan, args.data_path, "cpu")  # loaded once
        images, labels = plan_data.train_images.numpy(), plan_data.train_labels.numpy()
        test_images, test_labels = plan_data.test_images.numpy(), plan_data.test_labels.numpy()
    per_epoch = None
    if len(data["epochs"]) > 1 and data["prob_train"] is not None:
        mask = data["mask"]
        mem_per_epoch = np.stack([memorization(mask, t)["mem"] for t in data["train"]])
        loss = -np.log(np.clip(data["prob_train"][-1], 1e-7, 1.0))
        n_in = np.maximum(mask.sum(0), 1)
        per_epoch = {"epochs": list(data["epochs"]), "mem": mem_per_epoch,
                     "train_loss": (loss * mask).sum(0) / n_in,
                     "train_acc": [float((c * mask).sum() / mask.sum()) for c in data["correct_train"]],
                     "test_acc": [float(c.mean()) for c in data["correct_test"]]}
    return write_report(folder, mem=final["mem"], se=final["se"], n_in=final["n_in"], n_out=final["n_out"],
                        train_images=images, train_labels=labels, test_images=test_images, test_labels=test_labels,
                        influence={**infl, "threshold": args.influence_threshold}, per_epoch=per_epoch,
                        noisy_mask=noisy, summary=summary, threshold=args.mem_threshold,
                        forgetting=data.get("forgetting"), datamodels=data.get("datamodels"),
                        sections=data.get("sections", []))


def evaluation_run_name(args: argparse.Namespace) -> str:
    """What an evaluation is, readable in the MLflow run list: eval-<store folder>, e.g. eval-cifar100-r18, with
    -correct when it scores 0/1 correctness instead of probabilities."""
    return f"eval-{Path(args.run_dir).resolve().name}" + ("-correct" if args.target == "correct" else "")


def log_to_mlflow(args: argparse.Namespace, scores: np.ndarray, plan, summary: dict, sidecar: dict,
                  files: list[Path], report: list[Path], started: float, series: dict | None = None) -> None:
    """The evaluation's MLflow run, from `started` to now; its id and store are added to the score file's sidecar
    before the sidecar is logged, so a run that uses the scores can name the run that computed them. `series`
    (a stream plan's) are values per task boundary, logged at steps 1..T."""
    tracking_uri = args.tracking_uri or default_tracking_uri()
    logger = RunLogger(tracking_uri, args.experiment_name, args.run_name or evaluation_run_name(args),
                       start_time=started)
    try:
        record_score_run(args.out, scores, logger.run_id, tracking_uri)
        logger.log_params({k: v for k, v in vars(args).items()} | {k: v for k, v in sidecar.items() if k != "files"})
        logger.set_tags(environment_tags("cpu") | {"scores_sha256": array_digest(scores)})
        if plan is not None:  # released aux_arrays runs do not name their dataset
            log_plan_dataset(logger, plan.settings, args.data_path, "evaluation")
        logger.log_metrics({k: float(v) for k, v in summary.items()}, step=0)
        for key, values in (series or {}).items():
            logger.log_series(key, values, first_step=1)
        for path in files:
            logger.log_artifact(str(path))
        for path in report:
            logger.log_artifact(str(path), "report")
    except BaseException:
        logger.finish("FAILED" if isinstance(sys.exc_info()[1], Exception) else "KILLED")
        raise
    logger.finish()
    print("\n" + logger.where_to_look("memorization scores"), flush=True)
