"""Train many models on random subsets of a dataset: the data of the held-out memorization estimator.

    python train_splits.py --dataset seq-cifar100 --backbone resnet18 --n_models 2000 --subset_ratio 0.7 \
        --n_epochs 50 --lr 0.1 --batch_size 128 --out runs/cifar100-r18

The plan (inclusion masks, seeds, settings) is written into --out first; each model's predictions
follow as their own file. Running the same command again trains only what is missing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from backbones import BACKBONES
from datasets import DATASETS
from continual.args import declared_flags
from utils.errors import ConfigError, run_command
from utils.launchers import add_launcher_args, run_units
from utils.mlflow_logger import RunLogger, default_tracking_uri, environment_tags
from memorization.plan import Plan, balanced_masks, fingerprint, random_masks
from memorization.store import SubsetStore
from memorization.training import class_rows, dataset_args, train_and_store


def build_parser(backbone: type | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="seq-digits", help=f"one of: {', '.join(DATASETS.names())}")
    data.add_argument("--classes", default=None, help="'a,b': train on classes a ≤ c < b only (default: all)")
    data.add_argument("--data_path", default="./data")
    data.add_argument("--download", action="store_true")
    data.add_argument("--label_noise", type=float, default=0.0,
                      help="fraction of training examples relabeled (seeded), recorded as noisy_mask.npy")
    data.add_argument("--input_noise", type=float, default=0.0,
                      help="fraction of training images replaced by uniform noise (seeded), input_noise_mask.npy")
    plan = parser.add_argument_group("plan")
    plan.add_argument("--out", required=True, help="the run store folder")
    plan.add_argument("--n_models", type=int, default=100, help="models per subset ratio")
    plan.add_argument("--subset_ratio", default="0.7", help="fraction of the training set per model; several "
                                                            "comma-separated ratios for consistency scores")
    plan.add_argument("--mask_sampling", choices=("balanced", "random"), default="balanced",
                      help="balanced: every example in the same number of subsets (±1); random: independent draws")
    plan.add_argument("--seed", type=int, default=0, help="seeds the masks, model seeds and noise")
    train = parser.add_argument_group("training of each model")
    train.add_argument("--backbone", default=None, help=f"one of: {', '.join(BACKBONES.names())}")
    train.add_argument("--n_epochs", type=int, default=10)
    train.add_argument("--lr", type=float, required=True)
    train.add_argument("--batch_size", type=int, default=128)
    train.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd")
    train.add_argument("--optim_wd", type=float, default=0.0)
    train.add_argument("--optim_mom", type=float, default=0.9)
    train.add_argument("--optim_eps", type=float, default=1e-8)
    train.add_argument("--record_epochs", default="", help="also store predictions after these epochs, e.g. 1,5,10")
    train.add_argument("--save_logits", action="store_true", help="also store full logits (float16)")
    run = parser.add_argument_group("running")
    run.add_argument("--ensemble", type=int, default=1, help="models trained at once as one vectorised ensemble")
    run.add_argument("--device", default=None)
    run.add_argument("--chunk", default=None, metavar="I/N", help="train only chunk I of N of the plan's models")
    run.add_argument("--tracking_uri", default=None)
    run.add_argument("--experiment_name", default="split-training")
    run.add_argument("--run_name", default=None)
    run.add_argument("--non_verbose", action="store_true")
    add_launcher_args(parser)
    if backbone is not None:
        backbone.add_args(parser.add_argument_group(f"backbone {backbone.NAME}"))
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset", default="seq-digits")
    pre.add_argument("--backbone", default=None)
    known, _ = pre.parse_known_args(argv)
    backbone_name = known.backbone or DATASETS.get(known.dataset).DEFAULT_BACKBONE
    args = build_parser(BACKBONES.get(backbone_name)).parse_args(argv)
    args.backbone = backbone_name
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.ratios = _ratios(args.subset_ratio)
    args.classes = _classes(args.classes)
    args.record_epochs = sorted({int(e) for e in args.record_epochs.split(",") if e} | {args.n_epochs})
    checks = [(args.n_models >= 1, f"--n_models must be at least 1, got {args.n_models}"),
              (args.n_epochs >= 1, f"--n_epochs must be at least 1, got {args.n_epochs}"),
              (args.lr > 0, f"--lr must be positive, got {args.lr}"),
              (args.batch_size >= 1, f"--batch_size must be at least 1, got {args.batch_size}"),
              (args.ensemble >= 1, f"--ensemble must be at least 1, got {args.ensemble}"),
              (0 <= args.input_noise < 1, f"--input_noise is a fraction in [0, 1), got {args.input_noise}"),
              (all(1 <= e <= args.n_epochs for e in args.record_epochs),
               f"--record_epochs must lie in 1..{args.n_epochs}, got {args.record_epochs}")]
    for ok, sentence in checks:
        if not ok:
            raise ConfigError(sentence)
    args.chunk_index, args.chunk_count = _chunk(args.chunk)
    return args


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(r) for r in text.split(",")]
    except ValueError:
        raise ConfigError(f"--subset_ratio must be numbers separated by commas, got {text!r}") from None
    bad = [r for r in ratios if not 0 < r < 1]
    if bad:
        raise ConfigError(f"--subset_ratio must lie strictly between 0 and 1, got {bad[0]}")
    return ratios


def _classes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        a, b = (int(c) for c in text.split(","))
    except ValueError:
        raise ConfigError(f"--classes must be 'a,b' (classes a ≤ c < b), got {text!r}") from None
    if not 0 <= a < b:
        raise ConfigError(f"--classes {text} is an empty or negative range; pass 'a,b' with 0 ≤ a < b")
    return [a, b]


def _chunk(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        index, count = (int(c) for c in text.split("/"))
    except ValueError:
        raise ConfigError(f"--chunk must be 'I/N', e.g. 3/100, got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--chunk {text} is out of range: I must satisfy 0 ≤ I < N")
    return index, count


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
    sample = balanced_masks if args.mask_sampling == "balanced" else random_masks
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
        "n_models_per_ratio": args.n_models, "mask_sampling": args.mask_sampling, "seed": args.seed,
        "label_noise": args.label_noise, "input_noise": args.input_noise,
        "backbone": args.backbone, "backbone_args": backbone_args,
        "training": {"n_epochs": args.n_epochs, "lr": args.lr, "batch_size": args.batch_size,
                     "optimizer": args.optimizer, "optim_wd": args.optim_wd, "optim_mom": args.optim_mom,
                     "optim_eps": args.optim_eps, "record_epochs": args.record_epochs,
                     "save_logits": args.save_logits},
    }
    return Plan(settings, masks, model_ratio, model_seed, train_indices.astype(np.int64), dataset.noisy_mask,
                input_noise)


def groups_to_train(plan: Plan, finished: list[int], args: argparse.Namespace) -> list[list[int]]:
    """The missing models of this chunk, in groups of --ensemble models that share a subset ratio."""
    chunk = np.array_split(np.arange(plan.n_models), args.chunk_count)[args.chunk_index]
    todo = sorted(set(chunk.tolist()) - set(finished))
    groups = []
    for ratio in np.unique(plan.model_ratio):
        same = [i for i in todo if plan.model_ratio[i] == ratio]
        groups += [same[i:i + args.ensemble] for i in range(0, len(same), args.ensemble)]
    return groups


def run(args: argparse.Namespace) -> dict:
    store = SubsetStore(args.out)
    plan = make_plan(args)
    store.write_plan(plan)
    finished, problems = store.finished_models(plan, repair=True)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    groups = groups_to_train(plan, finished, args)
    n_todo = sum(len(g) for g in groups)
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
    units = [(str(store.folder), group, args.data_path, args.device) for group in groups]
    started, done = time.perf_counter(), 0
    bar = tqdm(total=n_todo, unit="model", disable=args.non_verbose, dynamic_ncols=True)
    try:
        for result in run_units(train_and_store, units, args, store.folder / "slurm"):
            done += len(result["model_ids"])
            per_hour = done / (time.perf_counter() - started) * 3600
            bar.update(len(result["model_ids"]))
            bar.set_postfix(models_per_hour=f"{per_hour:.0f}")
            if logger:
                logger.log_metrics({"models_stored": len(finished) + done, "models_per_hour": per_hour,
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
    print(f"trained {done} models in {elapsed:.1f} s; the store holds {len(finished) + done} of {plan.n_models}")
    return {"trained": done, "seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
