"""Loss of plasticity on a real-data long stream, and what L2Init and reset methods do about it.

random-label-digits: every task relabels the same 1000 digits images at random, and an MLP
(100-100, Adam 1e-3, batch 50, 60 epochs = 1200 steps per task) must fit the new labels. Nothing
carries over between tasks, so the terminal accuracy of each task (its accuracy on its own labels
at the end of the task, before any further update) measures only the ability to learn. Vanilla's
falls across tasks; L2Init and reset methods are meant to keep it up. Each method runs with 3
seeds through main.py's own entry point, logged to one MLflow store (<out>/mlflow.db); the script
writes the table to experiments/plasticity_random_labels.md and the figure next to it.

The hyperparameters are not tuned here (sweep.py is the tool for that): L2Init and CBP use λ and ρ
ten times below their ViT defaults, because with 1200 steps per task the defaults hold the network
near its initialisation (L2Init λ 1e-2: about 40% on every task) or replace two units per layer at
every step (CBP ρ 1e-2); ReDO checks every 200 steps at the paper's τ 0.025.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/plasticity_random_labels.py           # about 15 min on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python experiments/plasticity_random_labels.py --quick   # about 1 min
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # small MLPs run fastest single-threaded

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import numpy as np  # noqa: E402

from continual import run as main_py  # noqa: E402
from continual.args import parse_args  # noqa: E402
from utils.plots import close, plt  # noqa: E402

BASE = ["--model", "sgd", "--dataset", "random-label-digits", "--optimizer", "adam", "--lr", "1e-3",
        "--batch_size", "50", "--non_verbose", "--covariates"]
METHODS = {
    "vanilla": [],
    "l2init": ["--plasticity", "l2init", "--l2init_lambda", "1e-3"],
    "redo": ["--plasticity", "redo", "--redo_tau", "0.025", "--redo_every", "200"],
    "cbp": ["--plasticity", "cbp", "--cbp_rho", "1e-3"],
}
LAST_K = 5


def run_all(out: Path, seeds: list[int], n_tasks: int, n_epochs: int) -> dict:
    """Terminal accuracy and covariates per task, per method and seed (cached in <out>/results.json)."""
    cache = out / "results.json"
    results = json.loads(cache.read_text()) if cache.exists() else {}
    for method, flags in METHODS.items():
        for seed in seeds:
            key = f"{method}/{seed}/{n_tasks}/{n_epochs}"
            if key in results:
                continue
            start = time.time()
            state = main_py.run(parse_args([*BASE, *flags, "--seed", str(seed), "--n_tasks", str(n_tasks),
                                            "--n_epochs", str(n_epochs), "--experiment_name", "plasticity-random-labels",
                                            "--run_name", f"{method}-seed{seed}",
                                            "--tracking_uri", f"sqlite:///{out / 'mlflow.db'}"]))
            results[key] = {"terminal_test_acc": state.history["terminal_test_acc"],
                            **{k: state.history[f"covariates/{k}"] for k in ("dead_frac", "dormant_frac",
                                                                             "effective_rank_mean", "weight_mean_abs")}}
            results[key]["resets"] = state.history.get("plasticity/resets", [0.0] * n_tasks)
            print(f"{method} seed {seed}: {time.time() - start:.0f} s, last terminal accuracy "
                  f"{results[key]['terminal_test_acc'][-1]:.1f}", flush=True)
            cache.write_text(json.dumps(results))
    return results


def table(results: dict, seeds: list[int], n_tasks: int, n_epochs: int) -> str:
    lines = [f"| method | first {LAST_K} tasks | last {LAST_K} tasks | dead units (last task) | "
             f"dormant units (last task) | effective rank (last task) | resets per task |",
             "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        runs = [results[f"{method}/{s}/{n_tasks}/{n_epochs}"] for s in seeds]

        def cell(values, fmt="{:.1f}"):
            return f"{fmt.format(np.mean(values))} ± {fmt.format(np.std(values))}"

        first = [np.mean(r["terminal_test_acc"][:LAST_K]) for r in runs]
        last = [np.mean(r["terminal_test_acc"][-LAST_K:]) for r in runs]
        lines.append(f"| {method} | {cell(first)} | {cell(last)} | {cell([100 * r['dead_frac'][-1] for r in runs])}% | "
                     f"{cell([100 * r['dormant_frac'][-1] for r in runs])}% | {cell([r['effective_rank_mean'][-1] for r in runs])} | "
                     f"{cell([np.mean(r['resets']) for r in runs], '{:.0f}')} |")
    return "\n".join(lines)


def figure(results: dict, seeds: list[int], n_tasks: int, n_epochs: int, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    tasks = np.arange(1, n_tasks + 1)
    for method in METHODS:
        runs = [results[f"{method}/{s}/{n_tasks}/{n_epochs}"] for s in seeds]
        for ax, key, scale in ((axes[0], "terminal_test_acc", 1), (axes[1], "dormant_frac", 100)):
            values = scale * np.array([r[key] for r in runs])
            ax.plot(tasks, values.mean(0), label=method)
            ax.fill_between(tasks, values.mean(0) - values.std(0), values.mean(0) + values.std(0), alpha=0.2)
    axes[0].set_ylabel("terminal accuracy on the task's labels (%)")
    axes[1].set_ylabel("dormant units (ReDO τ 0.025, %)")
    for ax in axes:
        ax.set_xlabel("task")
        ax.legend()
    fig.suptitle(f"random-label-digits, MLP 100-100, Adam 1e-3, {n_epochs} epochs per task, mean ± std over {len(seeds)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "plasticity"))
    parser.add_argument("--quick", action="store_true", help="2 seeds, 6 tasks of 10 epochs (a smoke test)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds, n_tasks, n_epochs = ([0, 1], 6, 10) if args.quick else ([0, 1, 2], 20, 60)
    results = run_all(out, seeds, n_tasks, n_epochs)
    text = table(results, seeds, n_tasks, n_epochs)
    print(text)
    if not args.quick:
        (REPO / "experiments" / "plasticity_random_labels.md").write_text(
            f"random-label-digits, {n_tasks} tasks × {n_epochs} epochs, seeds {seeds}; terminal accuracy (%) "
            f"is each task's accuracy on its own labels at the end of the task, mean ± std over seeds.\n\n{text}\n")
        figure(results, seeds, n_tasks, n_epochs, REPO / "experiments" / "plasticity_random_labels.png")


if __name__ == "__main__":
    main()
