"""How well memorization scores find relabeled examples, as the number of split-trained models grows.

Trains MLPs on halves of seq-digits with 10% of the training labels flipped (train_splits.py), then
scores the first K models of the plan (eval's estimator) for growing K and prints the AUROC of the
scores at separating the relabeled examples from the clean ones. Because the plan's inclusion is
assigned greedily, every prefix of it is balanced too, so the first K models form a valid K-model run.

    python benchmarks/memorization_auroc.py [--max_models 32] [--epochs 100,30]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_splits  # noqa: E402
from memorization.driver import run_plan  # noqa: E402
from memorization.estimator import auroc, memorization  # noqa: E402
from memorization.store import SubsetStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_models", type=int, default=32)
    parser.add_argument("--epochs", default="100,30")
    parser.add_argument("--target", choices=("prob", "correct"), default="prob")
    args = parser.parse_args()
    sizes = [k for k in (2, 4, 8, 16, 32, 64, 128) if k <= args.max_models]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for epochs in (int(e) for e in args.epochs.split(",")):
            out = Path(folder) / f"e{epochs}"
            run_plan(train_splits.parse_args([
                "--dataset", "seq-digits", "--n_models", str(args.max_models), "--subset_ratio", "0.5",
                "--n_epochs", str(epochs), "--lr", "0.1", "--batch_size", "32", "--mlp_hidden", "256",
                "--label_noise", "0.1", "--ensemble", "16", "--out", str(out), "--non_verbose",
                "--tracking_uri", f"sqlite:///{Path(folder) / 'mlflow.db'}"]))
            store = SubsetStore(out)
            plan = store.load_plan()
            target = np.stack([store.read_model(i, plan)[f"{args.target}_train"][-1] for i in range(plan.n_models)])
            target = target.astype(np.float32)
            fit = np.mean([target[k][plan.inclusion_mask[k]].mean() for k in range(plan.n_models)])
            for k in sizes:
                scores = memorization(plan.inclusion_mask[:k], target[:k])
                rows.append((epochs, k, fit, int(scores["n_undefined"]), auroc(scores["mem"], plan.noisy_mask)))
    print(f"\n{'epochs':>6} {'models':>6} {'train ' + args.target:>11} {'undefined':>9} {'AUROC':>6}")
    for epochs, k, fit, undefined, value in rows:
        print(f"{epochs:>6} {k:>6} {fit:>11.3f} {undefined:>9} {value:>6.3f}")


if __name__ == "__main__":
    main()
