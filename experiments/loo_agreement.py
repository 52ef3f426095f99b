"""Do leave-one-out scores agree with the subset estimator? And how many seeds does a LOO model need?

On the embedded seq-digits (1438 training images, an MLP), through the repository's own entry points:

  a. the subset estimator: `train_splits.py` with --subset_models models on random halves, `eval_splits.py`
     -> subsets.npy (target: probability of the label);
  b. leave-one-out: `train_splits.py --plan_kind loo --loo_examples random:N --loo_seeds S` with the same
     training recipe, `eval_splits.py --compare subsets.npy` -> loo.npy;
  c. over the N left-out examples: the Spearman correlation of the LOO scores averaged over the first s
     seeds with the subset scores (s = 1..S), the agreement of two disjoint s-seed LOO estimates (seeds
     0..s-1 against s..2s-1: the reliability of an s-seed LOO score), and the subset estimator's own
     split-half agreement (its models in two halves) as the reference ceiling;
  d. the table, written to experiments/loo_agreement_results.md.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/loo_agreement.py            # full: about 40 min on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python experiments/loo_agreement.py --quick    # smoke test, about 1 min
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # small MLPs run fastest single-threaded

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import eval_splits  # noqa: E402
import train_splits  # noqa: E402
from memorization.driver import run_plan  # noqa: E402
from memorization.eval_driver import score_store  # noqa: E402
from memorization.estimator import memorization  # noqa: E402
from memorization.loo import loo_memorization, read_loo_store  # noqa: E402
from memorization.store import SubsetStore  # noqa: E402


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "loo_agreement"))
    parser.add_argument("--examples", type=int, default=256, help="examples left out (drawn at random)")
    parser.add_argument("--loo_seeds", type=int, default=8)
    parser.add_argument("--subset_models", type=int, default=128)
    parser.add_argument("--subset_ratio", type=float, default=0.5)
    parser.add_argument("--label_noise", type=float, default=0.0)
    parser.add_argument("--n_epochs", type=int, default=60)
    parser.add_argument("--results", default=str(REPO / "experiments" / "loo_agreement_results.md"))
    parser.add_argument("--quick", action="store_true", help="16 examples, 2 seeds, 16 subset models, 5 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.loo_seeds, args.subset_models, args.n_epochs = 16, 2, 16, 5
        args.out, args.results = args.out + "_quick", None
    return args


def recipe(args: argparse.Namespace) -> list[str]:
    return ["--dataset", "seq-digits", "--n_epochs", str(args.n_epochs), "--lr", "0.1", "--batch_size", "32",
            "--mlp_hidden", "256", "--label_noise", str(args.label_noise), "--ensemble", "16",
            "--tracking_uri", f"sqlite:///{args.out}/mlflow.db", "--non_verbose"]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    both = np.isfinite(a) & np.isfinite(b)
    return float(spearmanr(a[both], b[both]).statistic)


def main(argv: list[str] | None = None) -> None:
    args = parse_cli(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tracking = ["--tracking_uri", f"sqlite:///{out}/mlflow.db"]
    trained = run_plan(train_splits.parse_args([*recipe(args), "--n_models", str(args.subset_models),
                                                "--subset_ratio", str(args.subset_ratio), "--out", str(out / "subsets")]))
    score_store(eval_splits.parse_args(["--run_dir", str(out / "subsets"), "--out", str(out / "subsets.npy"),
                                        *tracking]))
    subset_seconds = time.time() - started
    trained_loo = run_plan(train_splits.parse_args([*recipe(args), "--plan_kind", "loo", "--loo_examples",
                                                    f"random:{args.examples}", "--loo_seeds", str(args.loo_seeds),
                                                    "--out", str(out / "loo")]))
    score_store(eval_splits.parse_args(["--run_dir", str(out / "loo"), "--out", str(out / "loo.npy"),
                                        "--compare", str(out / "subsets.npy"), *tracking]))
    loo_seconds = time.time() - started - subset_seconds

    store = SubsetStore(out / "loo")
    plan = store.load_plan()
    data = read_loo_store(store, plan, "prob", allow_partial=False)
    rows = plan.train_indices[data["positions"]]
    subsets = np.load(out / "subsets.npy")[rows]
    diff = data["self_diff"]  # [examples, seeds]
    table = []
    for s in range(1, args.loo_seeds + 1):
        mem = loo_memorization(diff[:, :s])["mem"]
        other = loo_memorization(diff[:, s:2 * s])["mem"] if 2 * s <= args.loo_seeds else None
        table.append((s, spearman(mem, subsets), spearman(mem, other) if other is not None else None))
    # The subset estimator's own split-half agreement on the same examples.
    sub_store = SubsetStore(out / "subsets")
    sub_plan = sub_store.load_plan()
    probs = np.stack([sub_store.read_model(i, sub_plan)["prob_train"][-1] for i in range(sub_plan.n_models)])
    half = sub_plan.n_models // 2
    halves = [memorization(sub_plan.inclusion_mask[part], probs[part].astype(np.float32))["mem"][rows]
              for part in (slice(0, half), slice(half, None))]
    subset_split_half = spearman(*halves)
    full_mem = loo_memorization(diff)["mem"]
    lines = [
        "# Leave-one-out against the subset estimator on seq-digits", "",
        f"Written by `experiments/loo_agreement.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        f"(load average at the end {os.getloadavg()[0]:.1f}); {time.time() - started:.0f} s in all "
        f"(subset store {subset_seconds:.0f} s, {trained['trained']} models trained; LOO store {loo_seconds:.0f} s, "
        f"{trained_loo['trained']} models trained; a rerun trains only what its store lacks).", "",
        f"Recipe of every model: MLP 64-256-10, {args.n_epochs} epochs, SGD lr 0.1 momentum 0.9, batch 32, "
        f"label noise {args.label_noise}. Subset estimator: {args.subset_models} models on random "
        f"{args.subset_ratio:g} subsets (balanced). LOO: {args.examples} examples drawn at random, "
        f"{args.loo_seeds} seeds, each seed one full model and one model without each example "
        f"({plan.n_models} models). Target: probability of the label.", "",
        f"Subset scores of these examples: mean {np.nanmean(subsets):.3f}, {np.mean(subsets >= 0.25):.0%} at or "
        f"above 0.25; LOO ({args.loo_seeds} seeds): mean {np.nanmean(full_mem):.3f}, "
        f"{np.mean(full_mem >= 0.25):.0%} at or above 0.25, {np.mean(full_mem == 0):.0%} exactly 0 (the float16 "
        f"probability is 1 with and without the example in every seed), median standard error "
        f"{np.nanmedian(loo_memorization(diff)['se']):.2g}.", "",
        "| LOO seeds s | Spearman with subset estimator | Spearman of two disjoint s-seed LOO estimates |",
        "|---|---|---|"]
    lines += [f"| {s} | {a:.3f} | {'' if b is None else f'{b:.3f}'} |" for s, a, b in table]
    moved = full_mem != 0
    lines += ["", f"On the {int(moved.sum())} examples whose {args.loo_seeds}-seed LOO score is not exactly 0, the "
                  f"Spearman correlation with the subset estimator is {spearman(full_mem[moved], subsets[moved]):.3f} "
                  f"({args.loo_seeds} seeds) and {spearman(diff[moved, 0], subsets[moved]):.3f} (1 seed)."]
    lines += ["", f"Subset estimator split-half ({half} against {sub_plan.n_models - half} models) on the same "
                  f"examples: Spearman {subset_split_half:.3f}.", ""]
    text = "\n".join(lines)
    print(text)
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
