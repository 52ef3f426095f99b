"""Train many models on random subsets of a dataset: the data of the held-out memorization estimator.

    python train_splits.py --dataset seq-cifar100 --backbone resnet18 --n_models 2000 --subset_ratio 0.7 \
        --n_epochs 50 --lr 0.1 --batch_size 128 --out runs/cifar100-r18

    python train_splits.py --plan_kind loo --loo_examples random:300 --loo_seeds 4 --n_epochs 50 --lr 0.1 \
        --out runs/digits-loo        # leave-one-out: per seed a model on everything and one without each example

    python train_splits.py --plan_kind stream --cl_model er --buffer_size 200 --n_models 16 --subset_ratio 0.5 \
        --lr 0.1 --n_epochs 5 --out runs/digits-stream-er   # learners running ER on half of every task's data

The plan (inclusion masks, seeds, settings) is written into --out first; each model's predictions
follow as their own file. Running the same command again trains only what is missing.
"""
from __future__ import annotations

import sys

from continual.catalogue import family
from memorization import args as splits_args
from utils.errors import run_command


def parse_args(argv: list[str] | None = None):
    """The arguments, the datasets and backbones read from the component catalogue: no torch before they are good.
    A stream plan's learners take main.py's flags, parsed by continual/stream_args.py."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--plan_kind=stream" for a in argv) or any(
            a == "--plan_kind" and b == "stream" for a, b in zip(argv, argv[1:])):
        from continual.stream_args import parse_stream_args

        return parse_stream_args(argv, family)
    return splits_args.parse_args(argv, family)


def run_plan(args):
    """memorization.driver.run_plan, imported here: torch, MLflow and the components only once the arguments are good;
    a stream plan's learners are continual runs (continual/stream_plan.py)."""
    from memorization.driver import run_plan

    if args.plan_kind == "stream":
        from continual.stream_plan import make_stream_plan, train_and_store_learners

        return run_plan(args, make_stream_plan, train_and_store_learners)
    return run_plan(args)


def main(argv: list[str] | None = None) -> int:
    return run_command(run_plan, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
