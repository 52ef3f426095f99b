"""The arguments of a stream plan (`train_splits.py --plan_kind stream`): train_splits.py's plan and running
flags, and main.py's flags for the continual run each learner makes.

    python train_splits.py --plan_kind stream --out runs/stream-er --n_models 16 --subset_ratio 0.5 \
        --cl_model er --buffer_size 200 --dataset seq-digits --lr 0.1 --n_epochs 1

Every flag train_splits.py does not have goes to main.py's parser, with the flags both programs have (--dataset,
--backbone, --lr, --n_epochs, --batch_size, --optimizer, ...) where they were given: a learner is main.py's run
with those flags, so an unknown or misspelt flag is refused by main.py's parser in its own words, and a flag left
out takes main.py's default, not train_splits.py's. The resolved continual configuration is part of the plan.
"""
from __future__ import annotations

import argparse
import json
from typing import Callable

from memorization.args import build_parser, parse_chunk, parse_ratios
from utils.errors import ConfigError

# train_splits.py flags that main.py has too: in a stream plan they set the learners' continual run.
SHARED = ("dataset", "backbone", "data_path", "download", "label_noise", "n_epochs", "lr", "batch_size", "optimizer",
          "optim_wd", "optim_mom", "optim_eps")
# train_splits.py flags of the stationary plans, which a continual run has no place for.
NOT_IN_STREAM = ("classes", "input_noise", "split_sampling", "loo_examples", "loo_seeds", "record_epochs",
                 "save_logits", "lr_schedule", "lr_milestones", "lr_warmup", "label_smoothing", "optim_nesterov",
                 "ensemble", "config")
# main.py flags a learner does not take: where to log, checkpoint or resume (the store does all three), its seed
# (the plan's), its device and thread count (train_splits.py's own).
NOT_FOR_LEARNERS = ("seed", "device", "num_threads", "resume", "loadcheck", "savecheck", "checkpoint_dir",
                    "tracking_uri", "experiment_name", "run_name")
# main.py flags whose numbers a learner's record has no place for (it keeps predictions, not MLflow metrics).
NOT_RECORDED = ("covariates", "log_every")
# main.py settings that say where or how verbosely a learner runs, not what it computes.
LOCAL = ("data_path", "download", "non_verbose", "figures", "seed", "device", "num_threads")


def given_flags(argv: list[str]) -> set[str]:
    return {token.split("=")[0][2:] for token in argv if token.startswith("--")}


def parse_stream_args(argv: list[str], family: Callable) -> argparse.Namespace:
    """The arguments of a stream plan: train_splits.py's flags parsed by its parser (`family` as for
    memorization/args.py), the rest by main.py's. Bad input ends with one sentence (ConfigError)."""
    parser = build_parser(family)
    parser.allow_abbrev = False  # a prefix of a main.py flag must not be taken for a train_splits.py flag
    args, rest = parser.parse_known_args(argv)
    given = given_flags(argv)
    for flag in NOT_IN_STREAM:
        if flag in given:
            raise ConfigError(f"--{flag} sets stationary subset plans and has no meaning with --plan_kind stream "
                              f"(each learner is a main.py run); drop it")
    for flag in NOT_FOR_LEARNERS:
        if flag in given_flags(rest):
            raise ConfigError(f"--{flag} is chosen by the stream plan for each learner (the store keeps its "
                              f"predictions, the plan seeds it); drop it")
    for flag in NOT_RECORDED:
        if flag in given_flags(rest):
            raise ConfigError(f"--{flag} logs a main.py run's metrics, and a stream learner's record keeps its "
                              f"predictions only; drop it (or run main.py for them)")
    if args.cl_model is None:
        raise ConfigError("--plan_kind stream needs --cl_model, the continual-learning method each learner runs "
                          "(a main.py --model, e.g. er with --buffer_size 200)")
    if len(str(args.subset_ratio).split(",")) != 1:
        raise ConfigError(f"a stream plan takes one --subset_ratio, got {args.subset_ratio}")
    shared = [token for flag in SHARED if flag in given for token in _tokens(parser, args, flag)]
    args.continual_argv = ["--model", args.cl_model, *shared, *rest]
    learner = learner_args(args.continual_argv, seed=args.seed, device=args.device, data_path=args.data_path)
    from datasets import DATASETS

    dataset = DATASETS.get(learner.dataset)
    if dataset.SETTING == "domain-il":
        raise ConfigError(f"{learner.dataset} is domain-incremental (every task holds every example), so a stream "
                          f"plan cannot give each task its own subset; pick a class-incremental dataset")
    from models import MODELS

    if getattr(MODELS.get(learner.model), "TASK_AWARE", False):
        raise ConfigError(f"{learner.model} predicts only when told each example's task, so a stream plan's "
                          f"predictions over all seen classes do not exist for it; pick a class-incremental method")
    args.continual = continual_config(learner)
    args.dataset, args.backbone, args.label_noise = learner.dataset, learner.backbone, learner.label_noise
    args.ratios = parse_ratios(args.subset_ratio)
    checks = [(args.n_models >= 2, f"--n_models must be at least 2 (some learners with each example, some without), "
                                   f"got {args.n_models}"),
              (args.cpu_threads >= 1, f"--cpu_threads must be at least 1, got {args.cpu_threads}"),
              (args.claim_timeout > 0, f"--claim_timeout must be positive, got {args.claim_timeout}"),
              (0 <= args.seed < 2**32, f"--seed must be in [0, 4294967295], got {args.seed}")]
    for ok, sentence in checks:
        if not ok:
            raise ConfigError(sentence)
    args.chunk_index, args.chunk_count = parse_chunk(args.chunk)
    args.classes, args.input_noise, args.ensemble = None, 0.0, 1
    args.device = args.device or learner.device
    return args


def _tokens(parser: argparse.ArgumentParser, args: argparse.Namespace, flag: str) -> list[str]:
    """A given train_splits.py flag as main.py tokens, with the value train_splits.py parsed."""
    value = getattr(args, flag)
    if isinstance(value, bool):
        return [f"--{flag}"] if value else []
    return [f"--{flag}", str(value)]


def learner_args(continual_argv: list[str], seed: int, device: str | None, data_path: str) -> argparse.Namespace:
    """main.py's arguments for one learner: the plan's continual flags, the learner's seed, quiet, no figures."""
    from continual.args import parse_args as continual_args

    device_flag = ["--device", device] if device else []  # none: main.py's choice, cuda when there is one
    return continual_args([*continual_argv, "--seed", str(seed), *device_flag, "--data_path", data_path,
                           "--num_threads", "1", "--non_verbose", "1", "--no_figures"])


def continual_config(learner: argparse.Namespace) -> dict:
    """What a learner's continual run computes from (main.py's computational configuration without the seed, device
    and data location), as JSON values: part of the plan, and checked again by every learner."""
    from continual.args import computational_config

    config = {k: v for k, v in computational_config(learner).items() if k not in LOCAL}
    return json.loads(json.dumps(config))
