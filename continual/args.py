"""Command-line arguments of main.py: common flags plus the flags each chosen component declares.

The parse reads the components from `continual.catalogue`, so `--help` and argument errors cost no
torch import; the components themselves are imported only for their own `check_args`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from continual.catalogue import family
from utils.config_files import as_argv, config_names, load_config
from utils.errors import ConfigError
from utils.optimizers import OPTIMIZERS
from utils.registry import (CommandParser, add_switch, check_bounds, declared_elsewhere, flags_of,
                            method_names)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs" / "best"
# Flags that say where to log or resume, not what is computed: a checkpoint may differ in these.
NON_COMPUTATIONAL = {"resume", "savecheck", "checkpoint_dir", "tracking_uri", "experiment_name", "run_name",
                     "non_verbose", "figures", "data_path", "download", "model_config", "config", "log_every", "num_threads",
                     "forgetting_events"}  # recording reads the forward passes training makes; it changes no result


def common_parser(first_pass: bool = False) -> argparse.ArgumentParser:
    """The flags every run has; the first pass only reads component names, so nothing is required yet."""
    parser = CommandParser(
        prog="main.py", usage=USAGE, description="Run one continual-learning experiment and log it to MLflow.",
        add_help=not first_pass, allow_abbrev=False)  # whole flag names only: si's --c is not --config
    what = parser.add_argument_group("what to run")
    names = {kind: ", ".join(family(kind).names()) for kind in ("dataset", "model", "backbone", "buffer policy",
                                                                  "plasticity method")}
    what.add_argument("--dataset", default="seq-digits", help=f"one of: {names['dataset']}")
    what.add_argument("--model", required=not first_pass, help=f"one of: {names['model']}")
    what.add_argument("--backbone", default=None, help=f"one of: {names['backbone']} (default: the dataset's)")
    what.add_argument("--buffer_policy", default="reservoir", help=f"for replay models, one of: {names['buffer policy']}")
    what.add_argument("--plasticity", default="",
                      help=f"comma-separated plasticity methods composed on top of the model, of: "
                           f"{names['plasticity method']}")
    what.add_argument("--model_config", choices=("default", "best"), default="default",
                      help="'best' loads the published hyperparameters from configs/best/<dataset>.yaml "
                           "(flags given explicitly still win)")
    what.add_argument("--config", default=None, metavar="FILE.yaml",
                      help="a YAML file of flag: value defaults (e.g. configs/vit_l3.yaml); flags given "
                           "explicitly still win")

    train = parser.add_argument_group("training")
    train.add_argument("--lr", type=float, default=None, help="learning rate (required unless --model_config best)")
    train.add_argument("--batch_size", type=int, default=None, help="stream batch size (default: the dataset's)")
    train.add_argument("--minibatch_size", type=int, default=None,
                       help="replay batch size (default: --batch_size)")
    train.add_argument("--n_epochs", type=int, default=None, help="epochs per task (default: the dataset's)")
    train.add_argument("--buffer_size", type=int, default=0, help="replay buffer size in examples")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="the optimizer of the network")
    train.add_argument("--optim_wd", type=float, default=0.0, help="weight decay")
    train.add_argument("--optim_mom", type=float, default=0.0, help="SGD momentum")
    train.add_argument("--optim_eps", type=float, default=1e-8, help="Adam/AdamW epsilon")
    train.add_argument("--reset_head", action="store_true",
                       help="deprecated: the same as adding head_reset to --plasticity, which it now does")
    train.add_argument("--seed", type=int, default=None, help="random seed (default: drawn and logged)")
    train.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    train.add_argument("--num_threads", type=int, default=0, metavar="N",
                       help="CPU threads of tensor operations; 0 chooses one for networks under 1M parameters, "
                            "else the cores the machine's load leaves free (the run's log says which and why)")

    data = parser.add_argument_group("data")
    data.add_argument("--data_path", "--base_path", dest="data_path", default="./data",
                      help="folder holding the datasets' standard files, in this framework's layout or Mammoth's "
                           "(--base_path is Mammoth's name for it)")
    data.add_argument("--download", action="store_true", help="download missing datasets (needs internet)")
    data.add_argument("--num_workers", type=int, default=None, metavar="N",
                      help="accepted for Mammoth command lines: datasets are tensors in memory here, read without "
                           "loader workers, so N changes nothing (a note says so); --num_threads sets CPU threads")
    data.add_argument("--n_tasks", type=int, default=None, help="number of tasks (default: the dataset's)")
    data.add_argument("--class_order", default=None, help="comma-separated original class ids, in task order")
    add_switch(data, "--permute_classes", help="shuffle the class order with --seed")
    data.add_argument("--label_noise", type=float, default=0.0,
                      help="fraction of training examples relabeled (to another class of their task), seeded")
    data.add_argument("--mem_scores", default=None, metavar="FILE.npy",
                      help="memorization score per training example (eval_splits.py output or a released float32 "
                           "array, dataset order): drives the memorization buffer policies and the per-bucket accuracy of any model")
    data.add_argument("--bucket_thresholds", default="0.1,0.25",
                      help="with --mem_scores: a,b cut the scores into three accuracy buckets, ≤ a, (a, b] and > b")

    record = parser.add_argument_group("logging and checkpoints")
    record.add_argument("--tracking_uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI if set, else sqlite:///<repo>/mlflow.db, "
                             "artifacts in <repo>/mlruns)")
    record.add_argument("--experiment_name", default="continual-learning", help="the MLflow experiment of the run")
    record.add_argument("--run_name", default=None,
                        help="the MLflow run's name (default: model, dataset, buffer, plasticity methods and seed "
                             "joined by '-')")
    # The bare flag is 'last', one kept file: sweep cells pass it bare, and 'task' keeps a file per task.
    record.add_argument("--savecheck", nargs="?", const="last", choices=("task", "last"), default=None,
                        help="keep <checkpoint_dir>/<run id>.pt for --resume: 'task' keeps the checkpoint written after "
                             "every task, 'last' (also the bare flag) the one written after the last task")
    record.add_argument("--checkpoint_dir", default=str(REPO_ROOT / "checkpoints"), help="where --savecheck writes")
    record.add_argument("--resume", "--loadcheck", dest="resume", default=None, metavar="PATH",
                        help="continue the run saved in this checkpoint of --savecheck (--loadcheck is Mammoth's "
                             "name for it; Mammoth's own checkpoint files are not read)")
    add_switch(record, "--non_verbose", help="no progress bars (Mammoth's --non_verbose 1 works too)")
    record.add_argument("--no_figures", dest="figures", action="store_false",
                        help="log metrics and CSV tables but draw no figures (they are most of a short run's time)")
    record.add_argument("--eval_scope", choices=("seen", "current"), default=None,
                        help="after each task evaluate every seen task (the accuracy matrix) or only the task "
                             "just trained (its terminal accuracy); default: current for long streams")
    record.add_argument("--last_k", default="50,10",
                        help="report the mean terminal accuracy over the last K tasks, for each K")
    record.add_argument("--covariates", action="store_true",
                        help="log plasticity covariates per task: dead and dormant units, neuron ages, weight "
                             "magnitudes, effective and stable rank, attention entropy (ViT)")
    record.add_argument("--log_every", type=int, default=0, metavar="N",
                        help="with --covariates, also log them every N optimizer steps (0: per task only)")
    record.add_argument("--probe_size", type=int, default=512,
                        help="training examples of the current task the covariates are measured on")
    record.add_argument("--dormant_tau", type=float, default=0.025,
                        help="ReDO threshold τ of the dormant-unit covariate")
    record.add_argument("--forgetting_events", action="store_true",
                        help="count each training example's forgetting events (correct → wrong between consecutive "
                             "presentations, Toneva et al. 2019) and log them as the score file "
                             "forgetting/events.npy, usable with --mem_scores")
    add_switch(record, "--ignore_other_metrics",
               help="accepted for Mammoth command lines; the metrics here are always the same few")
    add_switch(record, "--nowand", help="accepted for Mammoth command lines (no W&B here)")
    return parser


class _SkipSharedFlags:
    """Argument group wrapper for `--help` over every component: a flag two components share is shown once."""

    def __init__(self, group: argparse._ArgumentGroup):
        self.group = group
        self.shared: list[str] = []

    def add_argument(self, *names, **options):
        try:
            return self.group.add_argument(*names, **options)
        except argparse.ArgumentError:  # e.g. --alpha of der and derpp: the first declaration is shown
            self.shared.append(names[0])
            return None


CHOOSING_FLAG = {"dataset": "--dataset", "backbone": "--backbone", "model": "--model",
                 "buffer policy": "--buffer_policy", "plasticity method": "--plasticity"}
USAGE = ("%(prog)s --model NAME [--dataset NAME] [--backbone NAME] [--buffer_policy NAME] [--plasticity NAMES] "
         "[flags below]")


def _add_component_args(parser: argparse.ArgumentParser, kind: str, components: list, chosen: bool = True,
                        skip_shared: bool = False) -> None:
    """One argument group per component with the flags it declares; a flag another group already declared is
    shown once (`--help` over many components, or several plasticity methods)."""
    for component in components:
        how = "" if chosen else f" (with {CHOOSING_FLAG[kind]} {component.NAME})"
        group = parser.add_argument_group(f"{kind} {component.NAME}{how}")
        if not skip_shared and len(components) == 1:
            component.add_args(group)
            continue
        wrapper = _SkipSharedFlags(group)
        component.add_args(wrapper)
        if wrapper.shared:
            group.description = (f"also {', '.join(wrapper.shared)}, shown above for another component; "
                                 f"`{CHOOSING_FLAG[kind]} {component.NAME} --help` gives the meaning here")


def _best_config(dataset: str, model: str, buffer_size: int) -> dict:
    path = CONFIG_DIR / f"{dataset}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no published configuration for {dataset} (configs/best has {', '.join(known)}); "
                          f"pass the hyperparameters explicitly instead of --model_config best")
    table = yaml.safe_load(path.read_text())
    if model not in table:
        known = sorted(k for k in table if k != "source")
        raise ConfigError(f"{path.name} has no entry for model {model!r} (it has {', '.join(known)}); "
                          f"pass the hyperparameters explicitly instead of --model_config best")
    entries = table[model]
    key = "any" if "any" in entries else buffer_size
    if key not in entries:
        raise ConfigError(f"{path.name} has no {model} entry for --buffer_size {buffer_size} (published sizes: "
                          f"{', '.join(map(str, entries))}); use one of those or pass the hyperparameters explicitly")
    return dict(entries[key])


def full_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """main.py's parser with the flags of every component argv chooses, and --config's values as the flags
    that go before argv (so that argv's own win). With --help, the chosen components' flags come first and
    every other component's after the common flags."""
    first_parser = common_parser(first_pass=True)
    first, _ = first_parser.parse_known_args(argv)
    config = config_names(load_config(first.config), first_parser, first.config) if first.config else {}
    if config:
        first, _ = first_parser.parse_known_args([*as_argv(config, first_parser, first.config), *argv])
    parser = common_parser()
    help_asked = bool({"-h", "--help"} & set(argv))
    dataset = family("dataset").get(first.dataset)
    chosen = {"dataset": [dataset], "backbone": [family("backbone").get(first.backbone or dataset.DEFAULT_BACKBONE)],
              "model": [family("model").get(first.model)] if first.model else [],
              "buffer policy": [family("buffer policy").get(first.buffer_policy)],
              "plasticity method": [family("plasticity method").get(name) for name in method_names(first.plasticity)]}
    common_groups = parser._action_groups[2:]  # after argparse's own two: positionals and -h
    for kind, components in chosen.items():
        _add_component_args(parser, kind, components, skip_shared=kind == "plasticity method")
    if help_asked:  # argparse prints groups in the order of this list: the chosen components' first
        parser._action_groups[2:] = parser._action_groups[2 + len(common_groups):] + common_groups
    given = {token.split("=")[0] for token in argv if token.startswith("--")} | {f"--{name}" for name in config}
    for kind, components in chosen.items():
        # --help: the other components of each kind argv leaves at its default; a parse: every plasticity
        # method's flags, so that a stray one is refused by name
        if (help_asked and CHOOSING_FLAG[kind] not in given) or (not help_asked and kind == "plasticity method"):
            names = {c.NAME for c in components}
            _add_component_args(parser, kind, [c for c in family(kind).classes() if c.NAME not in names],
                                chosen=not help_asked, skip_shared=True)
    parser.elsewhere = lambda: declared_elsewhere(
        [(kind, CHOOSING_FLAG[kind], components[0].NAME if components else None, family(kind).classes())
         for kind, components in chosen.items() if kind != "plasticity method"])
    unknown = sorted(set(config) - set(flags_of(parser)))
    if unknown:
        raise ConfigError(f"--config {first.config} sets {', '.join(unknown)}, which no chosen component declares; "
                          f"fix the names (see python main.py --help)")
    if first.model_config == "best" and first.model:
        parser.set_defaults(**_best_config(first.dataset, first.model, first.buffer_size))
    return parser, as_argv(config, parser, first.config) if config else []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse in two passes: first the component names, then every flag those components declare."""
    argv = sys.argv[1:] if argv is None else argv
    parser, from_config = full_parser(argv)
    args = parser.parse_args([*from_config, *argv])
    if args.num_workers is not None:
        print(f"note: --num_workers {args.num_workers} changes nothing here: datasets are tensors in memory, read "
              f"without loader workers (--num_threads N sets the CPU threads)", file=sys.stderr)
    del args.num_workers  # no trace in the run's configuration: it has no effect
    for flag, method in DEPRECATED_FLAGS.items():
        if getattr(args, flag):
            print(f"--{flag} is deprecated: it now adds the plasticity method {method} (--plasticity {method}, which "
                  f"composes with the others); the run is the same", file=sys.stderr)
            if method not in method_names(args.plasticity):
                args.plasticity = ",".join([*method_names(args.plasticity), method])
            setattr(args, flag, False)
    _check_plasticity_flags(args, argv)
    return resolve(args)


def _check_plasticity_flags(args: argparse.Namespace, argv: list[str]) -> None:
    """Unknown plasticity methods, and flags of methods that were not chosen, end the run."""
    methods = family("plasticity method")
    chosen = [methods.get(name).name for name in method_names(args.plasticity)]
    given = {token.split("=")[0] for token in argv if token.startswith("--")}
    options = {c.name: {o for names, _ in c.flags for o in names} for c in methods.classes()}
    chosen_flags = set().union(*(options[name] for name in chosen))
    for name, flags in options.items():
        stray = sorted(f for f in flags - chosen_flags if f in given) if name not in chosen else []
        if stray:
            raise ConfigError(f"{', '.join(stray)} belongs to the plasticity method {name}, which is not in "
                              f"--plasticity ({args.plasticity or 'none'}); add {name} to --plasticity or drop the flag")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on the dataset or the machine, then refuse impossible values."""
    dataset = family("dataset").get(args.dataset)
    family("model").get(args.model)
    args.backbone = args.backbone or dataset.DEFAULT_BACKBONE
    family("backbone").get(args.backbone)
    family("buffer policy").get(args.buffer_policy)
    if args.batch_size is None:
        args.batch_size = dataset.DEFAULT_BATCH_SIZE
    if args.n_epochs is None:
        args.n_epochs = dataset.DEFAULT_N_EPOCHS
    if args.minibatch_size is None:
        args.minibatch_size = args.batch_size
    if args.eval_scope is None:
        args.eval_scope = "current" if dataset.LONG_STREAM else "seen"

    if args.lr is None:
        raise ConfigError("--lr is required (or --model_config best for the published value)")
    check_bounds(args, BOUNDS)
    if args.log_every and not args.covariates:
        raise ConfigError("--log_every N logs covariates every N steps; add --covariates")
    args.bucket_thresholds = _thresholds(args.bucket_thresholds)
    args.last_k = _last_k(args.last_k)
    # The components themselves (and torch) from here on: each chosen one checks its own flags.
    import torch

    from backbones import BACKBONES
    from buffer_policies import BUFFER_POLICIES
    from datasets import DATASETS
    from models import MODELS
    from plasticity import PLASTICITY

    chosen = [(PLASTICITY, name) for name in method_names(args.plasticity)]
    chosen += [(DATASETS, args.dataset), (BACKBONES, args.backbone), (MODELS, args.model),
               (BUFFER_POLICIES, args.buffer_policy)]
    for registry, name in chosen:  # every component's declared ranges, then its own checks
        component = registry.get(name)
        check_bounds(args, getattr(component, "BOUNDS", {}), f"the {registry.kind} {component.NAME}")
        if registry is MODELS:
            component.check_framework_args(args)  # what the framework needs of any model, override or not
        component.check_args(args)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device} asked for CUDA but no GPU is visible; pass --device cpu")
    return args


# Flags that became plasticity methods: flag → the method it adds to --plasticity.
DEPRECATED_FLAGS = {"reset_head": "head_reset"}
# Ranges of main.py's own flags (components declare theirs in their BOUNDS): see utils/registry.check_bounds.
BOUNDS = {"lr": "(0, inf)", "optim_mom": "[0, inf)", "optim_eps": "(0, inf)", "batch_size": "[1, inf)",
          "minibatch_size": "[1, inf)", "n_epochs": "[1, inf)", "buffer_size": "[0, inf)", "optim_wd": "[0, inf)",
          "log_every": "[0, inf)", "num_threads": "[0, inf)", "probe_size": "[1, inf)", "dormant_tau": "[0, inf)",
          "n_tasks": "[1, inf)", "label_noise": "[0, 1)", "seed": "[0, 4294967295]"}


def _thresholds(text: str) -> tuple[float, float]:
    try:
        low, high = (float(t) for t in str(text).split(","))
    except ValueError:
        raise ConfigError(f"--bucket_thresholds must be two numbers 'a,b', got {text!r}") from None
    if not low < high:
        raise ConfigError(f"--bucket_thresholds needs a < b, got {text!r}")
    return low, high


def _last_k(text) -> list[int]:
    if isinstance(text, list):
        return text
    try:
        values = [int(k) for k in str(text).split(",") if k.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"--last_k must be positive integers 'K1,K2', got {text!r}")
    return values


def computational_config(args: argparse.Namespace) -> dict:
    """The arguments that determine the results (what a checkpoint must agree on)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in NON_COMPUTATIONAL}
