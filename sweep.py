"""Compare methods fairly: grids × seeds of main.py runs, selection on one named metric, final runs, a report.

    python sweep.py sweeps/random_label_digits.yaml --launcher pool --max_parallel 2
    python sweep.py sweeps/imagenet_vit_l3_lr1e-3.yaml --launcher ray --gpus_per_task 0.25
    python sweep.py sweeps/random_label_digits.yaml --report_only

Each method's grid is run with the search seeds; per method the configuration with the best mean of
the selection metric (its value after the last task) is chosen and run again with the final seeds;
the report gives every metric as mean ± std over those final seeds. Everything goes to one MLflow
experiment named after the sweep: a parent run per version of the sweep file, a child run per cell.
Running the same file again runs only the cells that have not finished.
"""
from __future__ import annotations

import argparse
import sys

from utils.errors import run_command
from utils.launchers import add_launcher_args
from utils.registry import CommandParser


def build_parser() -> CommandParser:
    parser = CommandParser(prog="sweep.py", description=__doc__.splitlines()[0],
                           usage="%(prog)s SWEEP.yaml [flags below]")
    parser.add_argument("sweep_file", help="YAML file: base, methods (flags, grid, reuse), selection, seeds")
    parser.add_argument("--tracking_uri", default=None,
                        help="MLflow tracking URI (default: sqlite:///<repo>/mlflow.db); the driver alone writes it")
    parser.add_argument("--out", default=None, help="report and cell checkpoints (default: sweeps/results/<name>)")
    parser.add_argument("--report_only", action="store_true", help="rebuild the report from MLflow, run nothing")
    parser.add_argument("--claim_timeout", type=float, default=300.0,
                        help="drivers sharing a sweep's --out claim each cell; the cells of a driver that stopped "
                             "touching its claims for this many seconds (killed, machine lost) are taken over")
    add_launcher_args(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run_sweep(args: argparse.Namespace):
    """continual.sweep.run_sweep, imported here: numpy, MLflow and main.py's engine only once the arguments are good."""
    from continual.sweep import run_sweep

    return run_sweep(args)


def main(argv: list[str] | None = None) -> int:
    return run_command(run_sweep, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
