"""Command-line arguments of eval_splits.py: its parser, its flags and the checks of their values. Bad input ends
with one sentence (ConfigError). It imports nothing heavy, so eval_splits.py's OpenBLAS setting still comes before
numpy loads.
"""
from __future__ import annotations

import argparse

from utils.errors import ConfigError
from utils.registry import CommandParser

# The first line of eval_splits.py's docstring, shown by --help.
DESCRIPTION = "Turn a split-training store into per-example memorization, influence and consistency scores."


def build_parser() -> CommandParser:
    parser = CommandParser(prog="eval_splits.py", description=DESCRIPTION,
                           usage="%(prog)s --run_dir STORE --out SCORES.npy [flags below]")
    parser.add_argument("--run_dir", required=True, help="a train_splits.py --out folder, or a folder of released "
                                                         "<ratio>/<seed>/aux_arrays.npz runs")
    parser.add_argument("--out", required=True, help="the memorization scores (.npy); the rest is written beside it")
    parser.add_argument("--target", choices=("prob", "correct"), default="prob",
                        help="per-example target: softmax probability of the training label, or 0/1 correctness")
    parser.add_argument("--influence_topk", type=int, default=10,
                        help="the most influential training examples kept per test example")
    parser.add_argument("--influence_threshold", type=float, default=0.15,
                        help="influence from which a (training, test) pair is written to the high-influence pairs")
    parser.add_argument("--influence_full", action="store_true",
                        help="also write the full train × test influence matrix as a memory-mappable .npy")
    parser.add_argument("--datamodels", action="store_true",
                        help="also fit linear datamodels (Ilyas et al. 2022) of every test example's margin by LASSO "
                             "and compare them with the influence: NAME_datamodels.npz and a report section")
    parser.add_argument("--datamodel_val_fraction", type=float, default=0.1,
                        help="share of the models held out to choose each test example's regularisation")
    parser.add_argument("--datamodel_alphas", type=int, default=30, help="regularisations on each LASSO path")
    parser.add_argument("--lds_holdout", type=float, default=0.0, metavar="SHARE",
                        help="hold out the last SHARE of the models from every score and report the linear "
                             "datamodeling score (LDS) of the influence matrix (and --datamodels) on them")
    parser.add_argument("--lds_store", default=None, metavar="STORE",
                        help="score the influence matrix (and --datamodels) by LDS on the models of this second "
                             "store of the same examples instead")
    parser.add_argument("--loo_store", default=None, metavar="STORE",
                        help="a leave-one-out store of the same dataset: correlate the influence rows of its "
                             "left-out examples with their measured effects")
    parser.add_argument("--proxies", action="store_true",
                        help="also score single-run memorization proxies (learned-late, cumulative sample loss, "
                             "forgetting events, learned iteration) of the first --proxy_models models against the "
                             "estimator of the others: NAME_proxies.md (Spearman, Pearson with bootstrap intervals, "
                             "top-k overlap, AUROCs, cost) in the report and MLflow")
    parser.add_argument("--proxy_models", type=int, default=1, help="models whose records give the proxies")
    parser.add_argument("--proxy_boot", type=int, default=1000, help="bootstrap resamples of the proxy intervals")
    parser.add_argument("--mem_threshold", type=float, default=0.25, help="'memorized' if the score is at least this")
    parser.add_argument("--allow_partial", action="store_true", help="use the stored models even if some are missing")
    parser.add_argument("--compare", default=None, metavar="SCORES.npy",
                        help="another score file in dataset order (e.g. a released one): report the Spearman "
                             "correlation with it")
    parser.add_argument("--data_path", "--base_path", dest="data_path", default="./data",
                        help="where the dataset's files are (for the report's images), in main.py's layout or Mammoth's")
    parser.add_argument("--tracking_uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI if set, else sqlite:///<repo>/mlflow.db)")
    parser.add_argument("--experiment_name", default="split-training", help="the MLflow experiment of the run")
    parser.add_argument("--run_name", default=None,
                        help="the MLflow run's name (default: eval-<store folder>, -correct with --target correct)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if not args.out.endswith(".npy"):
        raise ConfigError(f"--out must name a .npy file, got {args.out!r}")
    if args.influence_topk < 1:
        raise ConfigError(f"--influence_topk must be at least 1, got {args.influence_topk}")
    if not 0 < args.datamodel_val_fraction <= 0.5:
        raise ConfigError(f"--datamodel_val_fraction must be above 0 and at most 0.5, "
                          f"got {args.datamodel_val_fraction}")
    if not 0 <= args.lds_holdout < 1 or (args.lds_holdout and args.lds_store):
        raise ConfigError(f"--lds_holdout is a share in [0, 1), and held-out models come from it or from --lds_store, "
                          f"not both; got {args.lds_holdout:g}" + (f" and {args.lds_store}" if args.lds_store else ""))
    if args.proxy_models < 1 or args.proxy_boot < 0:
        raise ConfigError(f"--proxy_models must be at least 1 and --proxy_boot at least 0, got {args.proxy_models} "
                          f"and {args.proxy_boot}")
    if args.datamodel_alphas < 2:
        raise ConfigError(f"--datamodel_alphas must be at least 2, got {args.datamodel_alphas}")
    return args
