"""Which examples should a small replay buffer keep? The memorization-in-CL paper's question, on the embedded data.

"What is the role of memorization in Continual Learning?" finds that with small buffers the least
memorized (typical) examples are the better choice, and that highly memorized ones matter more as
the buffer grows. This script asks the same of seq-digits (5 tasks x 2 classes, 1438 training
images, an MLP), in one process, through the repository's own entry points:

  a. subset-training memorization scores (memorization.driver.run_plan, memorization.eval_driver.score_store -> mem.npy, target prob);
  b. final class-IL accuracy (Acc) and forgetting (FM) of `er` (reservoir) against `maer` with the
     policies min / middle / max, driven by the scores (--mem_proxy none) or by the online proxy
     (--mem_proxy learned_iteration, no scores), for several buffer sizes and seeds (continual.run.run);
  c. forgetting per memorization bucket for `er` (train_acc_{low,middle,high}_per_task/task_i, read back from
     MLflow), on the clean labels and, when the clean high bucket is small, with 10% label noise
     (one score file per seed: the noise is drawn from --seed, and the score file's label
     fingerprint must match the run's labels);
  d. the Spearman correlation of each online proxy with the scores (maer with both, the scores choose);
  e. the tables, written to experiments/maer_digits_results.md, and a bucket figure.

Everything is logged to one MLflow store, <out>/mlflow.db (artifacts in <out>/mlruns/); the split
stores, score files and a log of every run's printout are in <out> too.

This file holds the command line and the runs; the numbers computed from them are in
maer_digits_stats.py, the results text and the figure in maer_digits_report.py.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/maer_digits.py            # full: about 12 min on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python experiments/maer_digits.py --quick    # a smoke test, about 2 min
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # small MLPs run fastest single-threaded

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import eval_splits  # noqa: E402
from memorization.eval_driver import score_store  # noqa: E402
from continual import run as main_py  # noqa: E402
import train_splits  # noqa: E402
from memorization.driver import run_plan  # noqa: E402
from continual.args import parse_args as main_parse_args  # noqa: E402
from continual.evaluation import memorization_buckets  # noqa: E402
# the statistics and the report, beside this file (the script's folder is first on sys.path)
from maer_digits_report import plot_buckets, report  # noqa: E402
from maer_digits_stats import SEEDS, acc_fm, bucket_counts, bucket_curves, bucket_summary  # noqa: E402

PROXIES = ("learned_iteration", "cumulative_loss")
QUICK = {"seeds": "0,1", "buffers": "20,200", "epochs": 1, "split_models": 16, "split_epochs": 10,
         "noise_models": 16, "out": str(REPO / "experiments" / "results" / "maer_digits_quick"),
         "results": None, "figure_copy": None}


# -- arguments ----------------------------------------------------------------------------------------
def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "maer_digits"),
                        help="output folder: MLflow store, split stores, scores, figure, logs (git-ignored)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds of the CL runs")
    parser.add_argument("--buffers", default="20,50,200,500", help="comma-separated buffer sizes (each >= 10)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per task of the CL runs")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--policies", default="min,middle,max", help="maer buffer policies compared")
    parser.add_argument("--bucket_buffer", type=int, default=200, help="buffer of the per-bucket forgetting runs")
    parser.add_argument("--spearman_buffer", type=int, default=200, help="buffer of the proxy-vs-scores runs")
    parser.add_argument("--spearman_policy", default="min", help="policy of the proxy-vs-scores runs")
    split = parser.add_argument_group("split training (memorization scores)")
    split.add_argument("--split_models", type=int, default=32)
    split.add_argument("--split_epochs", type=int, default=100)
    split.add_argument("--split_ratio", type=float, default=0.5)
    split.add_argument("--split_lr", type=float, default=0.1)
    split.add_argument("--split_batch", type=int, default=32)
    split.add_argument("--split_hidden", default="256")
    split.add_argument("--ensemble", type=int, default=16)
    noise = parser.add_argument_group("label-noise bucket analysis")
    noise.add_argument("--noise_analysis", choices=("auto", "always", "never"), default="auto",
                       help="auto: only when the clean high bucket holds fewer than --small_high of the examples")
    noise.add_argument("--small_high", type=float, default=0.10)
    parser.add_argument("--no_tie_check", dest="tie_check", action="store_false",
                        help="skip re-running min / middle with the scores' ties broken at random (at the smallest "
                             "and largest buffer; only done when over 10%% of the scores are tied)")
    noise.add_argument("--label_noise", type=float, default=0.1)
    noise.add_argument("--noise_models", type=int, default=16,
                       help="split models per seed for the noisy scores (16 give AUROC 0.99 on digits)")
    out = parser.add_argument_group("outputs")
    out.add_argument("--results", default=str(REPO / "experiments" / "maer_digits_results.md"),
                     help="the results table (also written into --out)")
    out.add_argument("--figure_copy", default=str(REPO / "experiments" / "maer_digits_buckets.png"),
                     help="where the bucket figure is copied for the README")
    parser.add_argument("--quick", action="store_true",
                        help=f"shrink everything for a smoke test ({', '.join(f'{k}={v}' for k, v in QUICK.items() if k not in ('out', 'results', 'figure_copy'))}; "
                             "results stay in the quick output folder)")
    given = {a.split("=")[0][2:] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    args = parser.parse_args(argv)
    if args.quick:  # flags given explicitly still win
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    args.buffers = [int(b) for b in str(args.buffers).split(",")]
    args.policies = str(args.policies).split(",")
    if min(args.buffers) < 10:
        parser.error("every buffer must hold at least one example of each of the 10 classes (>= 10)")
    return args


# -- running the repository's entry points in-process --------------------------------------------------
class Runner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.uri = f"sqlite:///{self.out / 'mlflow.db'}"
        self.log = open(self.out / "runs.log", "a")
        self.seconds = {}
        self.n_runs = 0
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(self.uri)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def _captured(self, title: str, call):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            result = call()
        self.log.write(f"\n$ {title}\n{buffer.getvalue()}")
        self.log.flush()
        return result, buffer.getvalue()

    def main(self, extra: list[str], seed: int) -> dict:
        """One main.py run; returns its class-IL matrix and MLflow run id."""
        argv = ["--dataset", "seq-digits", "--lr", str(self.args.lr), "--n_epochs", str(self.args.epochs),
                "--batch_size", str(self.args.batch_size), "--seed", str(seed), "--tracking_uri", self.uri,
                "--experiment_name", "maer_digits", "--non_verbose", *extra]
        start = time.perf_counter()
        state, text = self._captured("main.py " + " ".join(argv), lambda: main_py.run(main_parse_args(argv)))
        self.n_runs += 1
        run_id = re.search(r"MLflow run ([0-9a-f]{32})", text).group(1)
        print(f"  [{self.n_runs:3d}] {' '.join(extra)} --seed {seed}: class-IL "
              f"{np.mean(state.matrices['class_il'][-1]):.2f} ({time.perf_counter() - start:.1f} s)", flush=True)
        return {"matrix": state.matrices["class_il"].copy(), "run_id": run_id}

    def scores(self, name: str, seed: int, label_noise: float, n_models: int) -> tuple[Path, dict, np.ndarray]:
        """train_splits + eval_splits on seq-digits; returns the score file, eval summary and noisy mask."""
        a = self.args
        store = self.out / "splits" / name
        scores = self.out / "scores" / f"{name}.npy"
        common = ["--tracking_uri", self.uri, "--experiment_name", "maer_digits-splits"]
        split_argv = ["--dataset", "seq-digits", "--n_models", str(n_models), "--subset_ratio", str(a.split_ratio),
                      "--n_epochs", str(a.split_epochs), "--lr", str(a.split_lr), "--batch_size", str(a.split_batch),
                      "--mlp_hidden", a.split_hidden, "--ensemble", str(a.ensemble), "--seed", str(seed),
                      "--label_noise", str(label_noise), "--out", str(store), "--non_verbose", *common]
        eval_argv = ["--run_dir", str(store), "--out", str(scores), "--target", "prob", *common]
        start = time.perf_counter()
        self._captured("train_splits.py " + " ".join(split_argv), lambda: run_plan(train_splits.parse_args(split_argv)))
        result, _ = self._captured("eval_splits.py " + " ".join(eval_argv), lambda: score_store(eval_splits.parse_args(eval_argv)))
        noisy = np.load(store / "noisy_mask.npy", allow_pickle=False)
        print(f"  scores {scores.name}: {n_models} models, {time.perf_counter() - start:.1f} s; "
              + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result["summary"].items()),
              flush=True)
        return scores, result["summary"], noisy

    def history(self, run_id: str, key: str) -> dict[int, float]:
        return {m.step: m.value for m in self.client.get_metric_history(run_id, key)}


def random_scores(out: Path, seed: int, n: int) -> Path:
    """Uniform random values per training example (no sidecar: only the length is checked)."""
    path = out / "scores" / f"random_seed{seed}.npy"
    np.save(path, np.random.default_rng([seed, 123]).random(n, dtype=np.float32))
    return path


def jittered_scores(out: Path, seed: int, scores: np.ndarray) -> Path:
    """The scores plus uniform noise of 1e-6: ties broken at random, every other order kept."""
    path = out / "scores" / f"mem_random_ties_seed{seed}.npy"
    noise = np.random.default_rng([seed, 321]).random(len(scores)) * 1e-6
    np.save(path, (scores.astype(np.float64) + noise).astype(np.float32))
    return path


# -- the experiment ------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> str:
    # maer logs NaN for a task whose proxy is constant (e.g. every example learned at once); that is reported
    warnings.filterwarnings("ignore", message="An input array is constant")
    warnings.filterwarnings("ignore", message="Mean of empty slice")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    SEEDS[0] = len(args.seeds)
    started_at = datetime.now(timezone.utc)
    wall = time.perf_counter()
    load_before = os.getloadavg()
    runner = Runner(args)
    print(f"output folder {runner.out}; MLflow store {runner.uri}", flush=True)

    # a. scores on the clean labels
    print("a. subset-training scores (clean labels)", flush=True)
    with runner.phase("a. clean scores"):
        mem, mem_summary, _ = runner.scores("mem", seed=0, label_noise=0.0, n_models=args.split_models)
    scores = np.load(mem)
    from datasets import DATASETS
    labels = DATASETS.get("seq-digits")(main_parse_args(["--model", "sgd", "--lr", "0.1", "--seed", "0"])).train.labels.numpy()

    # b. Acc / FM per buffer, method, value source
    print("b. er / maer runs", flush=True)
    results: dict[tuple[str, str, int], list[dict]] = {}
    with runner.phase("b. sgd / er / maer runs"):
        for seed in args.seeds:
            results.setdefault(("sgd", "none", 0), []).append(runner.main(["--model", "sgd"], seed))
        bucket_buffers = sorted(set(args.buffers) | {args.bucket_buffer})
        for b in bucket_buffers:  # er with the scores: identical training, plus the per-bucket accuracies
            for seed in args.seeds:
                results.setdefault(("er", "reservoir", b), []).append(
                    runner.main(["--model", "er", "--buffer_size", str(b), "--mem_scores", str(mem)], seed))
        for b in args.buffers:
            for seed in args.seeds:  # control: the same quotas and re-selection, a uniform random choice
                results.setdefault(("random", "control", b), []).append(runner.main(
                    ["--model", "maer", "--buffer_policy", "min", "--buffer_size", str(b),
                     "--mem_scores", str(random_scores(runner.out, seed, len(scores))), "--mem_proxy", "none"], seed))
            for policy in args.policies:
                for seed in args.seeds:
                    results.setdefault((policy, "scores", b), []).append(runner.main(
                        ["--model", "maer", "--buffer_policy", policy, "--buffer_size", str(b),
                         "--mem_scores", str(mem), "--mem_proxy", "none"], seed))
                    results.setdefault((policy, "proxy", b), []).append(runner.main(
                        ["--model", "maer", "--buffer_policy", policy, "--buffer_size", str(b),
                         "--mem_proxy", "learned_iteration"], seed))
    n_tasks = results[("sgd", "none", 0)][0]["matrix"].shape[0]

    # b'. do ties in the scores matter? min / middle again with ties broken at random
    tie_fraction = 1.0 - len(np.unique(scores[np.isfinite(scores)])) / max(1, np.isfinite(scores).sum())
    tie_policies = [p for p in args.policies if p in ("min", "middle")]
    if args.tie_check and tie_fraction > 0.1 and tie_policies:
        print(f"b'. {100 * tie_fraction:.0f}% of the scores repeat another's value: min / middle with random "
              f"tie-breaking", flush=True)
        with runner.phase("b'. tie-break check"):
            for b in sorted({args.buffers[0], args.buffers[-1]}):
                for policy in tie_policies:
                    for seed in args.seeds:
                        results.setdefault((policy, "scores, random ties", b), []).append(runner.main(
                            ["--model", "maer", "--buffer_policy", policy, "--buffer_size", str(b), "--mem_scores",
                             str(jittered_scores(runner.out, seed, scores)), "--mem_proxy", "none"], seed))

    # d. proxy vs scores (the scores choose)
    print("d. proxy vs scores", flush=True)
    spearman: dict[str, list[list[float]]] = {}
    same_as_scores_only = []
    with runner.phase("d. proxy-vs-scores runs"):
        for proxy in PROXIES:
            for seed in args.seeds:
                r = runner.main(["--model", "maer", "--buffer_policy", args.spearman_policy, "--buffer_size",
                                 str(args.spearman_buffer), "--mem_scores", str(mem), "--mem_proxy", proxy], seed)
                per_task = runner.history(r["run_id"], f"model/spearman_{proxy}_vs_scores")
                spearman.setdefault(proxy, []).append([per_task.get(t, np.nan) for t in range(1, n_tasks + 1)])
                twin = results.get((args.spearman_policy, "scores", args.spearman_buffer))
                if twin is not None:
                    reference = twin[args.seeds.index(seed)]["matrix"]
                    same_as_scores_only.append(bool(np.array_equal(reference, r["matrix"], equal_nan=True)))

    # c. forgetting per bucket
    print("c. forgetting per memorization bucket", flush=True)
    with runner.phase("c. bucket read-back"):
        er_ids = [r["run_id"] for r in results[("er", "reservoir", args.bucket_buffer)]]
        clean = bucket_summary(bucket_curves(runner.history, er_ids, n_tasks), n_tasks)
    counts = bucket_counts(scores)
    high_fraction = counts["high"] / max(1, len(scores))
    do_noise = args.noise_analysis == "always" or (args.noise_analysis == "auto" and high_fraction < args.small_high)
    noisy_summary, noisy_counts, noisy_in_high, noisy_auroc = None, [], [], []
    if do_noise:
        print(f"   high bucket holds {counts['high']} of {len(scores)} examples ({100 * high_fraction:.1f}%): "
              f"repeating with --label_noise {args.label_noise}", flush=True)
        with runner.phase("c. label-noise scores and er runs"):
            ids = []
            for seed in args.seeds:
                noisy_mem, summary, noisy_mask = runner.scores(f"mem_noise{args.label_noise}_seed{seed}", seed=seed,
                                                               label_noise=args.label_noise, n_models=args.noise_models)
                noisy_scores = np.load(noisy_mem)
                noisy_counts.append(bucket_counts(noisy_scores))
                high = memorization_buckets(noisy_scores, 0.1, 0.25) == 2
                noisy_in_high.append((int((high & noisy_mask).sum()), int(noisy_mask.sum())))
                noisy_auroc.append(summary.get("auroc_relabeled", np.nan))
                ids.append(runner.main(["--model", "er", "--buffer_size", str(args.bucket_buffer), "--label_noise",
                                        str(args.label_noise), "--mem_scores", str(noisy_mem)], seed)["run_id"])
            noisy_summary = bucket_summary(bucket_curves(runner.history, ids, n_tasks), n_tasks)

    figure = runner.out / "maer_digits_buckets.png"
    panels = [("clean labels", clean)]
    if noisy_summary is not None:
        panels.append((f"{int(100 * args.label_noise)}% label noise", noisy_summary))
    plot_buckets(panels, figure, n_tasks)
    if args.figure_copy:
        shutil.copyfile(figure, args.figure_copy)

    elapsed = time.perf_counter() - wall
    load_after = os.getloadavg()
    text = report(args, runner, results, n_tasks, scores, labels, counts, mem_summary, clean, noisy_summary,
                  noisy_counts, noisy_in_high, noisy_auroc, spearman, same_as_scores_only, elapsed, started_at,
                  load_before, load_after)
    (runner.out / "maer_digits_results.md").write_text(text)
    if args.results:
        Path(args.results).write_text(text)
    json.dump({f"{m}|{s}|{b}": [acc_fm(r["matrix"]) for r in rs] for (m, s, b), rs in results.items()},
              open(runner.out / "acc_fm.json", "w"), indent=1)
    print()
    print(text)
    print(f"written: {runner.out / 'maer_digits_results.md'}" + (f", {args.results}" if args.results else "")
          + f"; figure {figure}" + (f" (copied to {args.figure_copy})" if args.figure_copy else ""))
    runner.log.close()
    return text


def cli_main(argv: list[str] | None = None) -> int:
    run(parse_cli(argv))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
