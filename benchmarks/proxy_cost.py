"""What a single-run memorization proxy costs against the subset estimator, and what it agrees with.

Trains one store per dataset (train_splits.py with --record_epochs at every epoch, vectorised ensembles) and
evaluates it with `eval_splits.py --proxies`, which times each proxy (the training seconds of its model plus
computing it) and the estimator (the training seconds of all its models plus the estimator), then prints both
with their ratio and the proxy's Spearman correlation with the estimator. On seq-longtail the AUROC for the
singletons (the known answer), on seq-digits with --label_noise 0.1 the AUROC for the relabeled examples.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/proxy_cost.py [--models 32] [--epochs 10]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import eval_splits  # noqa: E402
import train_splits  # noqa: E402
from benchmarks.engine_throughput import load_average, machine  # noqa: E402

DATASETS = {"seq-longtail": [], "seq-digits": ["--label_noise", "0.1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=32, help="models of each store (one gives the proxies)")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    print(f"machine: {machine()}; load average {load_average()}")
    lines = ["| dataset | proxy | proxy s | estimator s | estimator / proxy | Spearman with estimator | AUROC |",
             "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        tracking = f"sqlite:///{folder}/mlflow.db"
        for dataset, extra in DATASETS.items():
            store, out = Path(folder) / dataset, Path(folder) / f"{dataset}.npy"
            train_splits.run_plan(train_splits.parse_args([
                "--dataset", dataset, *extra, "--n_models", str(args.models), "--subset_ratio", "0.5",
                "--n_epochs", str(args.epochs), "--record_epochs", ",".join(map(str, range(1, args.epochs + 1))),
                "--lr", "0.1", "--batch_size", "32", "--ensemble", "16", "--non_verbose", "--out", str(store),
                "--tracking_uri", tracking]))
            eval_splits.score_store(eval_splits.parse_args([
                "--run_dir", str(store), "--out", str(out), "--proxies", "--tracking_uri", tracking]))
            rows = json.loads(Path(folder, f"{dataset}_proxies.json").read_text())
            estimator = rows[0]
            found = "auroc_singleton" if "auroc_singleton" in estimator else "auroc_relabeled"
            lines.append(f"| {dataset} | {estimator['name']} | — | {estimator['seconds']:.2f} | 1 | 1 | "
                         f"{estimator[found]:.3f} |")
            for row in rows[1:]:
                lines.append(f"| {dataset} | {row['name']} | {row['seconds']:.2f} | {estimator['seconds']:.2f} | "
                             f"{estimator['seconds'] / row['seconds']:.1f} | {row['spearman']:.3f} | "
                             f"{row[found]:.3f} |")
    print("\n".join(lines))
    print(f"load average {load_average()}")


if __name__ == "__main__":
    main()
