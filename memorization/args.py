"""Command-line arguments of train_splits.py: its parser, its flags (with the chosen backbone's) and the checks of
their values and combinations, as `continual/args.py` serves main.py. Bad input ends with one sentence (ConfigError).
eval_splits.py's arguments are in `memorization/eval_args.py`.

The datasets and backbones are read through `family(kind)` (train_splits.py passes the component catalogue, which
answers without importing torch), so `--help` and an argument error cost no torch import.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

from utils.config_files import as_argv, config_names, load_config
from utils.errors import ConfigError
from utils.launchers import add_launcher_args
from utils.optimizers import SCHEDULES
from utils.registry import CommandParser, add_switch, declared_elsewhere, flags_of

# The first line of train_splits.py's docstring, shown by --help.
DESCRIPTION = "Train many models on random subsets of a dataset: the data of the held-out memorization estimator."


def build_parser(family: Callable, backbone=None) -> CommandParser:
    """train_splits.py's flags, with those of `backbone` (a registered backbone or its catalogue record)."""
    parser = CommandParser(prog="train_splits.py", description=DESCRIPTION,
                           usage="%(prog)s --out STORE --lr LR [--dataset NAME] [--backbone NAME] [flags below]")
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="a YAML file of flag: value defaults, e.g. a recipe of configs/splits/; flags given "
                             "explicitly still win")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="seq-digits", help=f"one of: {', '.join(family('dataset').names())}")
    data.add_argument("--classes", default=None, help="'a,b': train on classes a ≤ c < b only (default: all)")
    data.add_argument("--data_path", "--base_path", dest="data_path", default="./data",
                      help="folder holding the dataset's standard files, in main.py's layout or Mammoth's")
    data.add_argument("--download", action="store_true", help="download a missing dataset (needs internet)")
    data.add_argument("--label_noise", type=float, default=0.0,
                      help="fraction of training examples relabeled (seeded), recorded as noisy_mask.npy")
    data.add_argument("--input_noise", type=float, default=0.0,
                      help="fraction of training images replaced by uniform noise (seeded), input_noise_mask.npy")
    plan = parser.add_argument_group("plan")
    plan.add_argument("--out", required=True, help="the run store folder")
    plan.add_argument("--plan_kind", choices=("subsets", "loo", "stream"), default="subsets",
                      help="subsets: models on random subsets (the held-out estimator); loo: leave-one-out, per "
                           "seed one model on every example and one without each of --loo_examples; stream: "
                           "learners that each run --cl_model's whole continual protocol on a subset of every "
                           "task, predictions stored after every task")
    plan.add_argument("--cl_model", default=None, metavar="NAME",
                      help="stream plans: the continual-learning method of every learner (a main.py --model); "
                           "every flag train_splits.py does not have is main.py's, e.g. --buffer_size 200")
    plan.add_argument("--n_models", type=int, default=100, help="models per subset ratio")
    plan.add_argument("--subset_ratio", default="0.7", help="fraction of the training set per model; several "
                                                            "comma-separated ratios for consistency scores")
    plan.add_argument("--split_sampling", "--mask_sampling", dest="split_sampling",
                      choices=("balanced", "random", "stratified"), default="balanced",
                      help="balanced: every example in the same number of subsets (±1); random: independent draws; "
                           "stratified: balanced within each class, so every subset holds the same share of each "
                           "class")
    plan.add_argument("--loo_examples", default=None, metavar="SPEC",
                      help="loo plans: the examples left out, as dataset indices: random:N (drawn with --seed), "
                           "indices and ranges such as 0-99,512, or a .npy / text file of indices")
    plan.add_argument("--loo_seeds", type=int, default=4,
                      help="loo plans: seeds per left-out example, each with its own full model (same seed, same "
                           "initialisation, same batch order but for the left-out example); seed noise is of the "
                           "order of the signal, so average several")
    plan.add_argument("--seed", type=int, default=0, help="seeds the masks, model seeds and noise")
    train = parser.add_argument_group("training of each model")
    train.add_argument("--backbone", default=None,
                       help=f"one of: {', '.join(family('backbone').names())} (default: the dataset's)")
    train.add_argument("--n_epochs", type=int, default=10, help="epochs of each model")
    train.add_argument("--lr", type=float, default=None, help="learning rate (required, here or in --config)")
    train.add_argument("--batch_size", type=int, default=128, help="training batch size")
    train.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd", help="the optimizer")
    train.add_argument("--optim_wd", type=float, default=0.0, help="weight decay")
    train.add_argument("--optim_mom", type=float, default=0.9, help="SGD momentum")
    train.add_argument("--optim_eps", type=float, default=1e-8, help="Adam/AdamW epsilon")
    train.add_argument("--optim_nesterov", action="store_true", help="Nesterov momentum (SGD)")
    train.add_argument("--lr_schedule", choices=SCHEDULES, default="none",
                       help="multistep: ×0.1 at each --lr_milestones; cosine: to 0; onecycle: linear to 0")
    train.add_argument("--lr_milestones", default="0.7,0.9",
                       help="multistep milestones as fractions of the epochs (the memorization-in-CL paper: 0.7,0.9)")
    train.add_argument("--lr_warmup", type=float, default=0.0,
                       help="fraction of all steps over which the rate rises linearly from 0 (any schedule)")
    train.add_argument("--label_smoothing", type=float, default=0.0, help="label smoothing of the cross-entropy")
    train.add_argument("--record_epochs", default="", help="also store predictions after these epochs, e.g. 1,5,10")
    train.add_argument("--save_logits", action="store_true", help="also store full logits (float16)")
    run = parser.add_argument_group("running")
    run.add_argument("--ensemble", type=int, default=1,
                     help="models trained at once as one vectorised ensemble; the plan's unit of work")
    run.add_argument("--cpu_threads", type=int, default=1,
                     help="torch threads of each job on the CPU (part of the plan: convolution results depend on it)")
    run.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--chunk", default=None, metavar="I/N", help="train only chunk I of N of the plan's groups")
    run.add_argument("--claim_timeout", type=float, default=300.0,
                     help="seconds after which the groups claimed by a driver that stopped touching its claims "
                          "(killed, machine lost) are taken over by another driver of the same store")
    run.add_argument("--replace_plan", action="store_true",
                     help="train this plan in a store whose plan.json is gone and whose models are another plan's "
                          "(they are set aside); without it such a store is refused")
    run.add_argument("--tracking_uri", default=None,
                     help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI if set, else sqlite:///<repo>/mlflow.db)")
    run.add_argument("--experiment_name", default="split-training", help="the MLflow experiment of the run")
    run.add_argument("--run_name", default=None,
                     help="the MLflow run's name (default: what the plan is, e.g. splits-seq-digits-mlp-16x0.5-s0)")
    add_switch(run, "--non_verbose", help="no progress bar")
    add_launcher_args(parser)
    if backbone is not None:
        backbone.add_args(parser.add_argument_group(f"backbone {backbone.NAME}"))
        parser.elsewhere = lambda: declared_elsewhere([("backbone", "--backbone", backbone.NAME,
                                                         family("backbone").classes())])
    return parser


def parse_args(argv: list[str] | None, family: Callable) -> argparse.Namespace:
    """The arguments of train_splits.py; `family(kind)` gives the datasets and backbones (`.get(name)`, `.names()`,
    `.classes()`), from their registries or from the component catalogue."""
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--dataset", default=None)
    pre.add_argument("--backbone", default=None)
    known, _ = pre.parse_known_args(argv)
    config = load_config(known.config) if known.config else {}
    if known.dataset and config.get("dataset", known.dataset) != known.dataset:
        raise ConfigError(f"--config {known.config} is a recipe for {config['dataset']}, not {known.dataset}; pass "
                          f"the recipe of {known.dataset} or drop --dataset")
    dataset = known.dataset or config.get("dataset", "seq-digits")
    backbone_name = known.backbone or config.get("backbone") or family("dataset").get(dataset).DEFAULT_BACKBONE
    parser = build_parser(family, family("backbone").get(backbone_name))
    config = config_names(config, parser, known.config)
    unknown = sorted(set(config) - set(flags_of(parser)))
    if unknown:
        raise ConfigError(f"--config {known.config} sets {', '.join(unknown)}, which train_splits.py does not have; "
                          f"fix the names (see python train_splits.py --help)")
    args = parser.parse_args([*(as_argv(config, parser, known.config) if config else []), *argv])
    args.backbone = backbone_name
    args.ratios = parse_ratios(args.subset_ratio)
    args.classes = _classes(args.classes)
    args.record_epochs = sorted({int(e) for e in args.record_epochs.split(",") if e} | {args.n_epochs})
    if args.lr is None:
        raise ConfigError("--lr is required: pass it, or a --config recipe that sets it")
    checks = [(args.n_models >= 1, f"--n_models must be at least 1, got {args.n_models}"),
              (args.n_epochs >= 1, f"--n_epochs must be at least 1, got {args.n_epochs}"),
              (0 < args.lr < math.inf, f"--lr must be a positive number, got {args.lr}"),
              (0 <= args.optim_mom < math.inf, f"--optim_mom must be a finite number ≥ 0, got {args.optim_mom}"),
              (0 <= args.optim_wd < math.inf, f"--optim_wd must be a finite number ≥ 0, got {args.optim_wd}"),
              (args.batch_size >= 1, f"--batch_size must be at least 1, got {args.batch_size}"),
              (args.ensemble >= 1, f"--ensemble must be at least 1, got {args.ensemble}"),
              (args.cpu_threads >= 1, f"--cpu_threads must be at least 1, got {args.cpu_threads}"),
              (args.claim_timeout > 0, f"--claim_timeout must be positive, got {args.claim_timeout}"),
              (0 <= args.seed < 2**32, f"--seed must be in [0, 4294967295], got {args.seed}"),
              (args.lr_warmup < 1 and args.lr_warmup >= 0, f"--lr_warmup is a fraction in [0, 1), got {args.lr_warmup}"),
              (0 <= args.label_smoothing < 1, f"--label_smoothing is in [0, 1), got {args.label_smoothing}"),
              (0 <= args.input_noise < 1, f"--input_noise is a fraction in [0, 1), got {args.input_noise}"),
              (all(1 <= e <= args.n_epochs for e in args.record_epochs),
               f"--record_epochs must lie in 1..{args.n_epochs}, got {args.record_epochs}")]
    for ok, sentence in checks:
        if not ok:
            raise ConfigError(sentence)
    _check_plan_kind(args, argv, config)
    args.chunk_index, args.chunk_count = parse_chunk(args.chunk)
    args.lr_milestones = _milestones(args.lr_milestones)
    import torch  # only once the arguments are good: --help and a refused flag cost no torch import

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


SUBSET_FLAGS = ("n_models", "subset_ratio", "split_sampling")


def _check_plan_kind(args: argparse.Namespace, argv: list[str], config: dict) -> None:
    """A loo plan needs its examples; the flags of the other kind are refused rather than silently ignored."""
    given = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")} | set(config)
    given |= {"split_sampling"} if "mask_sampling" in given else set()
    if args.plan_kind == "loo":
        if args.loo_examples is None:
            raise ConfigError("--plan_kind loo needs --loo_examples (e.g. random:300, 0-99 or a .npy file of "
                              "dataset indices)")
        if args.loo_seeds < 1:
            raise ConfigError(f"--loo_seeds must be at least 1, got {args.loo_seeds}")
        clash = [f for f in SUBSET_FLAGS if f in given]
        if clash:
            raise ConfigError(f"--{clash[0]} sets subset plans and has no meaning with --plan_kind loo; drop it")
    if args.plan_kind == "stream":
        raise ConfigError("stream plans are parsed by train_splits.py (continual/stream_args.py); run train_splits.py")
    if "cl_model" in given:
        raise ConfigError("--cl_model sets the learners of stream plans; add --plan_kind stream or drop it")
    if given & {"loo_examples", "loo_seeds"} and args.plan_kind != "loo":
        raise ConfigError("--loo_examples and --loo_seeds set leave-one-out plans; add --plan_kind loo or drop them")


def _milestones(text) -> list[float]:
    try:
        milestones = sorted(float(m) for m in str(text).split(",") if m.strip())
    except ValueError:
        raise ConfigError(f"--lr_milestones must be fractions separated by commas, e.g. 0.7,0.9, got {text!r}") from None
    if not all(0 < m < 1 for m in milestones):
        raise ConfigError(f"--lr_milestones are fractions of the epochs, each strictly between 0 and 1, got {text!r}")
    return milestones


def parse_ratios(text: str) -> list[float]:
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


def parse_chunk(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        index, count = (int(c) for c in text.split("/"))
    except ValueError:
        raise ConfigError(f"--chunk must be 'I/N', e.g. 3/100, got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--chunk {text} is out of range: I must satisfy 0 ≤ I < N")
    return index, count
