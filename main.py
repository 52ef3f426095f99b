"""Run one continual-learning experiment and log it to MLflow.

    python main.py --model er --dataset seq-digits --buffer_size 200 --lr 0.1
"""
from __future__ import annotations

import sys

from continual.args import parse_args
from utils.errors import run_command


def run(args):
    """continual.run.run, imported here: torch, MLflow and the components only once the arguments are good."""
    from continual.run import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
