"""The seed paper's question on the embedded data: which examples should a small replay buffer keep?

"What is the role of memorization in Continual Learning?" finds that with small buffers the least
memorized (typical) examples are the better choice, and that highly memorized ones matter more as
the buffer grows. This script asks the same of seq-digits (5 tasks x 2 classes, 1438 training
images, an MLP), in one process, through the repository's own entry points:

  a. split-training memorization scores (train_splits.run, eval_splits.run -> mem.npy, target prob);
  b. final class-IL accuracy (Acc) and forgetting (FM) of `er` (reservoir) against `maer` with the
     policies min / middle / max, driven by the scores (--mem_proxy none) or by the online proxy
     (--mem_proxy learned_iteration, no scores), for several buffer sizes and seeds (main.run);
  c. forgetting per memorization bucket for `er` (train_acc_{low,middle,high}_task_i, read back from
     MLflow), on the clean labels and, when the clean high bucket is small, with 10% label noise
     (one score file per seed: the noise is drawn from --seed, and the score file's label
     fingerprint must match the run's labels);
  d. the Spearman correlation of each online proxy with the scores (maer with both, the scores choose);
  e. the tables, written to experiments/maer_digits_results.md, and a bucket figure.

Everything is logged to one MLflow store, <out>/mlflow.db (artifacts in <out>/mlruns/); the split
stores, score files and a log of every run's printout are in <out> too.

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
import platform  # noqa: E402
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
from continual import run as main_py  # noqa: E402
import train_splits  # noqa: E402
from continual.args import parse_args as main_parse_args  # noqa: E402
from continual.evaluation import BUCKETS, forgetting, memorization_buckets  # noqa: E402
from utils.mlflow_logger import git_commit  # noqa: E402

PROXIES = ("learned_iteration", "cumulative_loss")
PAPER_SPEARMAN = 0.73  # learned_iteration vs split-training scores, CIFAR-100 (METHODS.md)
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
        self._captured("train_splits.py " + " ".join(split_argv), lambda: train_splits.run(train_splits.parse_args(split_argv)))
        result, _ = self._captured("eval_splits.py " + " ".join(eval_argv), lambda: eval_splits.run(eval_splits.parse_args(eval_argv)))
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


# -- statistics and formatting -------------------------------------------------------------------------
def mean_std(values) -> tuple[float, float]:
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def fmt(values, digits: int = 1) -> str:
    mean, std = mean_std(values)
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if np.isfinite(std) else f"{mean:.{digits}f}"


def acc_fm(matrix: np.ndarray) -> tuple[float, float]:
    last = matrix.shape[0] - 1
    return float(np.mean(matrix[last])), forgetting(matrix, last)


def paired(a: list[float], b: list[float]) -> tuple[float, float, int, int]:
    """Mean and standard error of the per-seed differences a − b, and how many seeds have a > b."""
    d = np.asarray(a) - np.asarray(b)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se, int((d > 0).sum()), len(d)


T_CRITICAL = {}  # seeds -> two-sided 95% critical value of Student's t with seeds − 1 degrees of freedom


def significant(d: float, se: float, n: int | None = None) -> bool:
    """A paired difference outside the 95% paired-t interval (needs at least two seeds)."""
    from scipy.stats import t
    n = n or SEEDS[0]
    if n < 2 or not np.isfinite(se):
        return False
    if n not in T_CRITICAL:
        T_CRITICAL[n] = float(t.ppf(0.975, n - 1))
    return bool(abs(d) > T_CRITICAL[n] * se)


SEEDS = [0]  # number of seeds of the run, set in run()


def verdict(d: float, se: float, a: str = "min", b: str = "max") -> str:
    if not significant(d, se):
        return f"no clear difference between {a} and {b}"
    return f"{a} clearly better than {b}" if d > 0 else f"{b} clearly better than {a}"


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{model}, {cores} cores available, shared with other jobs; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), CPU")


# -- part c: forgetting per memorization bucket ----------------------------------------------------------
def bucket_curves(runner: Runner, run_ids: list[str], n_tasks: int) -> dict:
    """Per seed and bucket: A[t, i] = train accuracy (%) of task i's examples in the bucket after task t."""
    out = {b: [] for b in BUCKETS}
    for run_id in run_ids:
        for b in BUCKETS:
            a = np.full((n_tasks, n_tasks), np.nan)
            for i in range(n_tasks):
                for t, value in runner.history(run_id, f"train_acc_{b}_task_{i}").items():
                    a[t, i] = value
            out[b].append(a)
    return out


def bucket_summary(curves: dict, n_tasks: int) -> dict:
    """Per bucket, per seed: mean over past tasks (i < T−1) of accuracy at learning, at the end, and their drop."""
    last = n_tasks - 1
    summary = {}
    for b, per_seed in curves.items():
        learned, end, drop, past = [], [], [], []
        for a in per_seed:
            diag, final = np.diag(a)[:last], a[last, :last]
            both = np.isfinite(diag) & np.isfinite(final)
            learned.append(float(np.mean(diag[both])) if both.any() else np.nan)
            end.append(float(np.mean(final[both])) if both.any() else np.nan)
            drop.append(float(np.mean(diag[both] - final[both])) if both.any() else np.nan)
            # mean accuracy of the past tasks i < t after task t, for t = 1..T−1
            past.append([float(np.nanmean(a[t, :t])) if np.isfinite(a[t, :t]).any() else np.nan
                         for t in range(1, n_tasks)])
        summary[b] = {"learned": learned, "end": end, "forgetting": drop, "past": np.array(past)}
    return summary


def bucket_counts(scores: np.ndarray, thresholds=(0.1, 0.25)) -> dict[str, int]:
    bucket = memorization_buckets(scores, *thresholds)
    return {name: int((bucket == k).sum()) for k, name in enumerate(BUCKETS)} | {"undefined": int((bucket < 0).sum())}


def task_counts(scores: np.ndarray, labels: np.ndarray, bucket_index: int, thresholds=(0.1, 0.25)) -> list[int]:
    bucket = memorization_buckets(scores, *thresholds)
    return [int(((labels // 2 == t) & (bucket == bucket_index)).sum()) for t in range(5)]


def plot_buckets(panels: list[tuple[str, dict]], path: Path, n_tasks: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"low": "tab:blue", "middle": "tab:orange", "high": "tab:red"}
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 2.9), dpi=90, sharey=True, squeeze=False)
    x = np.arange(2, n_tasks + 1)
    for ax, (title, summary) in zip(axes[0], panels):
        for b in BUCKETS:
            past = summary[b]["past"]
            if not np.isfinite(past).any():
                continue
            mean = np.nanmean(past, axis=0)
            std = np.nanstd(past, axis=0, ddof=1) if len(past) > 1 else np.zeros_like(mean)
            ax.plot(x, mean, "o-", color=colours[b], label=b, markersize=4)
            ax.fill_between(x, mean - std, mean + std, color=colours[b], alpha=0.15, linewidth=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("after training task", fontsize=8)
        ax.set_xticks(x)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("train acc. of past tasks (%)", fontsize=8)
    axes[0][0].legend(fontsize=7, title="memorization", title_fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


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
    print("a. split-training scores (clean labels)", flush=True)
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
                per_task = runner.history(r["run_id"], f"spearman_{proxy}_vs_scores")
                spearman.setdefault(proxy, []).append([per_task.get(t, np.nan) for t in range(n_tasks)])
                twin = results.get((args.spearman_policy, "scores", args.spearman_buffer))
                if twin is not None:
                    reference = twin[args.seeds.index(seed)]["matrix"]
                    same_as_scores_only.append(bool(np.array_equal(reference, r["matrix"], equal_nan=True)))

    # c. forgetting per bucket
    print("c. forgetting per memorization bucket", flush=True)
    with runner.phase("c. bucket read-back"):
        er_ids = [r["run_id"] for r in results[("er", "reservoir", args.bucket_buffer)]]
        clean = bucket_summary(bucket_curves(runner, er_ids, n_tasks), n_tasks)
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
            noisy_summary = bucket_summary(bucket_curves(runner, ids, n_tasks), n_tasks)

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


def report(args, runner, results, n_tasks, scores, labels, counts, mem_summary, clean, noisy_summary, noisy_counts,
           noisy_in_high, noisy_auroc, spearman, same_as_scores_only, elapsed, started_at, load_before,
           load_after) -> str:
    af = {key: [acc_fm(r["matrix"]) for r in rs] for key, rs in results.items()}
    acc = {key: [v[0] for v in vs] for key, vs in af.items()}
    fm = {key: [v[1] for v in vs] for key, vs in af.items()}
    columns = [("er", "reservoir"), ("random", "control")] + [(p, s) for s in ("scores", "proxy") for p in args.policies]
    names = {("er", "reservoir"): "ER (reservoir)", ("random", "control"): "random (quotas)"} | {
        (p, s): f"{p} ({s})" for p, s in columns[2:]}
    n_seeds = len(args.seeds)
    lines = ["# Memorization-aware replay on seq-digits", ""]
    lines += [
        f"seq-digits (scikit-learn's 8×8 digits: 1438 training / 359 test images, 5 tasks × 2 classes), "
        f"MLP backbone (the dataset's default), SGD lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs per "
        f"task; seeds {', '.join(map(str, args.seeds))}; mean ± std over the {n_seeds} seeds (std with ddof 1). "
        f"Acc = final class-IL accuracy (mean of the last row of the accuracy matrix, %); FM = forgetting after "
        f"the last task (mean over earlier tasks of best earlier accuracy − final accuracy, %). "
        f"`scores` = `maer --mem_scores mem.npy --mem_proxy none`, scores from {mem_summary['n_models']} split "
        f"MLPs (hidden {args.split_hidden}, {args.split_epochs} epochs, ratio {args.split_ratio}, batch "
        f"{args.split_batch}, lr {args.split_lr}, target prob); `proxy` = `maer --mem_proxy learned_iteration` "
        f"without scores; `random` = `maer --buffer_policy min --mem_scores <uniform random values> --mem_proxy none`, "
        f"the same per-task quotas and end-of-task re-selection as min/middle/max with a random choice, which "
        f"separates the effect of memorization from that of maer's buffer scheme. sgd (no buffer): Acc {fmt(acc[('sgd', 'none', 0)])}, FM {fmt(fm[('sgd', 'none', 0)])}.",
        ""]
    for title, table in (("Final class-IL accuracy Acc (%)", acc), ("Forgetting FM (%)", fm)):
        lines += [f"**{title}**", "", "| buffer | " + " | ".join(names[c] for c in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for b in args.buffers:
            lines.append(f"| {b} | " + " | ".join(fmt(table[(m, s, b)]) for m, s in columns) + " |")
        lines.append("")

    # min vs max, paired over seeds
    lines += ["**Paired differences over seeds** (Acc points; mean ± standard error over the per-seed differences; "
              "in brackets the seeds where the first is higher)", "",
              "| buffer | min − max (scores) | min − max (proxy) | best scores policy − random | "
              "best proxy policy − random | random − ER |",
              "|---|---|---|---|---|---|"]
    diffs = {}
    for b in args.buffers:
        cells = []
        for s in ("scores", "proxy"):
            if "min" in args.policies and "max" in args.policies:
                d = paired(acc[("min", s, b)], acc[("max", s, b)])
                diffs[(s, b)] = d
                cells.append(f"{d[0]:+.1f} ± {d[1]:.1f} ({d[2]}/{d[3]})")
            else:
                cells.append("–")
        for s in ("scores", "proxy"):
            best = max(args.policies, key=lambda p: np.mean(acc[(p, s, b)]))
            d = paired(acc[(best, s, b)], acc[("random", "control", b)])
            cells.append(f"{best} {d[0]:+.1f} ± {d[1]:.1f} ({d[2]}/{d[3]})")
        d = paired(acc[("random", "control", b)], acc[("er", "reservoir", b)])
        cells.append(f"{d[0]:+.1f} ± {d[1]:.1f} ({d[2]}/{d[3]})")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines.append("")

    # buckets
    t = (0.1, 0.25)
    high_tasks = task_counts(scores, labels, 2)
    lines += [f"## Forgetting per memorization bucket (ER, reservoir, buffer {args.bucket_buffer})", "",
              f"Buckets of the split-training scores: low ≤ {t[0]} < middle ≤ {t[1]} < high. Clean labels: "
              f"low {counts['low']}, middle {counts['middle']}, high {counts['high']} of {len(scores)} training "
              f"examples (high per task: {', '.join(map(str, high_tasks))}); {100 * np.mean(scores == 0):.0f}% of "
              f"the scores are exactly 0 (the in- and out-of-subset models agree to float16 precision)."]
    if noisy_summary is not None:
        mean_counts = {k: np.mean([c[k] for c in noisy_counts]) for k in BUCKETS}
        flipped_high = np.mean([h for h, _ in noisy_in_high])
        flipped = np.mean([n for _, n in noisy_in_high])
        lines[-1] += (f" The clean high bucket is small, so the analysis is repeated with {int(100 * args.label_noise)}% "
                      f"of the training labels flipped (`--label_noise {args.label_noise}`, drawn from each seed; one "
                      f"score file per seed from {args.noise_models} split MLPs, AUROC of the scores for the flipped "
                      f"examples {fmt(noisy_auroc, 3)}): mean bucket sizes low {mean_counts['low']:.0f}, middle "
                      f"{mean_counts['middle']:.0f}, high {mean_counts['high']:.0f}; {flipped_high:.0f} of the "
                      f"{flipped:.0f} flipped examples are in the high bucket. Training accuracy is measured "
                      f"against the (noisy) training labels.")
    else:
        lines[-1] += f" (The label-noise repetition was not run: --noise_analysis {args.noise_analysis}.)"
    lines += ["", f"Training accuracy (%) of the examples of each past task (tasks 1–{n_tasks - 1}), right after "
                  f"learning the task and after the last task; forgetting = the difference, averaged over those tasks; "
                  f"mean ± std over seeds.", "",
              "| labels | bucket | right after learning | after the last task | forgetting |", "|---|---|---|---|---|"]
    for title, summary in (("clean", clean), (f"noise {args.label_noise}", noisy_summary)):
        if summary is None:
            continue
        for b in BUCKETS:
            lines.append(f"| {title} | {b} | {fmt(summary[b]['learned'])} | {fmt(summary[b]['end'])} | "
                         f"{fmt(summary[b]['forgetting'])} |")
    lines += ["", "![training accuracy of past tasks per memorization bucket](maer_digits_buckets.png)", ""]

    # spearman
    lines += [f"## Online proxies against the split-training scores", "",
              f"`maer --mem_scores mem.npy --mem_proxy X --buffer_policy {args.spearman_policy} --buffer_size "
              f"{args.spearman_buffer}` (the scores choose the buffer; the proxy is only recorded). Spearman "
              f"correlation over each task's training examples where the proxy is defined, after each task; mean "
              f"over the {n_tasks} tasks, then mean ± std over seeds.", "",
              "| proxy | Spearman with the scores | per task (mean over seeds) | paper (CIFAR-100) |", "|---|---|---|---|"]
    for proxy, per_seed in spearman.items():
        per_seed = np.array(per_seed)
        lines.append(f"| {proxy} | {fmt(np.nanmean(per_seed, axis=1), 2)} | "
                     f"{', '.join(f'{v:.2f}' for v in np.nanmean(per_seed, axis=0))} | "
                     f"{PAPER_SPEARMAN if proxy == 'learned_iteration' else '–'} |")
    if same_as_scores_only:
        lines += ["", f"Recording a proxy beside the scores left the runs unchanged: "
                      f"{sum(same_as_scores_only)} of {len(same_as_scores_only)} accuracy matrices identical to the "
                      f"`--mem_proxy none` runs of the same seed."]
    lines.append("")

    # reading
    lines += ["## What the numbers show", ""]
    small, large = args.buffers[0], args.buffers[-1]
    for s, label in (("scores", "split-training scores"), ("proxy", "the learned-iteration proxy")):
        if (s, small) not in diffs:
            continue
        ds, dl = diffs[(s, small)], diffs[(s, large)]
        min_wins_small = significant(*ds[:2]) and ds[0] > 0
        max_wins_large = significant(*dl[:2]) and dl[0] < 0
        gap_closes = dl[0] < ds[0] and significant(ds[0] - dl[0], float(np.hypot(ds[1], dl[1])))
        if min_wins_small and gap_closes:
            reading = ("This follows the paper's pattern: the least memorized examples are the better choice for the "
                       "smallest buffer and the advantage shrinks as the buffer grows"
                       + (f", here to the point where max is better at buffer {large}." if max_wins_large else "."))
        elif min_wins_small or max_wins_large:
            reading = "This matches the paper's pattern only in part."
        elif not significant(*ds[:2]) and not significant(*dl[:2]):
            reading = "So the paper's pattern is not reproduced here: the choice of examples makes no measurable difference."
        else:
            reading = "This runs against the paper's pattern."
        lines.append(
            f"- With {label}: at buffer {small}, min − max = {ds[0]:+.1f} ± {ds[1]:.1f} points ({ds[2]}/{ds[3]} "
            f"seeds favour min): {verdict(*ds[:2])}; at buffer {large}, {dl[0]:+.1f} ± {dl[1]:.1f} ({dl[2]}/{dl[3]}): "
            f"{verdict(*dl[:2])}. " + reading)
        vs = {(p, b): paired(acc[(p, s, b)], acc[("random", "control", b)]) for p in ("min", "max") for b in (small, large)
              if p in args.policies}
        if len(vs) == 4:
            mark = lambda d: f"{d[0]:+.1f} ± {d[1]:.1f}{'*' if significant(*d[:2]) else ''}"
            note = []
            if not (significant(*vs[("min", small)][:2]) and vs[("min", small)][0] > 0) and \
                    significant(*vs[("max", small)][:2]) and vs[("max", small)][0] < 0:
                note.append(f"at buffer {small} the gap comes from max doing worse than a random choice, not from "
                            f"min doing better")
            if significant(*vs[("max", large)][:2]) and vs[("max", large)][0] > 0:
                note.append(f"at buffer {large} max beats a random choice")
            lines.append(f"  Against the random control with the same quotas ({label}; * = significant): min "
                         f"{mark(vs[('min', small)])}, max {mark(vs[('max', small)])} at buffer {small}; min "
                         f"{mark(vs[('min', large)])}, max {mark(vs[('max', large)])} at buffer {large}"
                         + (": " + "; ".join(note) if note else "") + ".")
    n_comparisons = 2 * len(args.buffers) * len(args.policies)
    lines.append(f"- Significance here means outside the 95% paired-t interval over the {n_seeds} seeds; with "
                 f"{n_comparisons} policy comparisons against each reference, about {0.05 * n_comparisons:.0f} "
                 f"would cross it by chance.")
    for reference, label in ((("random", "control"), "the random control (same quotas)"),
                             (("er", "reservoir"), "reservoir ER")):
        beats = []
        for s in ("scores", "proxy"):
            for b in args.buffers:
                for p in args.policies:
                    d = paired(acc[(p, s, b)], acc[(*reference, b)])
                    if significant(d[0], d[1]):
                        beats.append(f"{p} ({s}) at buffer {b}: {d[0]:+.1f} ± {d[1]:.1f}")
        lines.append(f"- Against {label}, significant Acc differences: "
                     + ("; ".join(beats) if beats else "none") + ".")
    control = [(b, paired(acc[("random", "control", b)], acc[("er", "reservoir", b)])) for b in args.buffers]
    lines.append("- The random control against reservoir ER (the buffer scheme alone, no memorization): "
                 + "; ".join(f"buffer {b}: {d[0]:+.1f} ± {d[1]:.1f}" for b, d in control) + ".")
    if noisy_summary is not None or clean:
        parts = []
        for title, summary in (("clean", clean), ("noisy", noisy_summary)):
            if summary is None:
                continue
            f = {b: mean_std(summary[b]["forgetting"])[0] for b in BUCKETS}
            parts.append(f"{title}: low {f['low']:.1f}, middle {f['middle']:.1f}, high {f['high']:.1f} points")
        f = {b: mean_std(clean[b]["forgetting"])[0] for b in BUCKETS}
        order = " (the more memorized, the more forgotten)" if f["low"] < f["middle"] < f["high"] else ""
        lines.append(f"- Forgetting per bucket under ER, buffer {args.bucket_buffer} (mean over seeds) — "
                     + "; ".join(parts) + f"{order if noisy_summary is None else ''}." + (
                         f" On clean labels{order or ' the order is not monotone'}." if noisy_summary is not None else ""))
    spear = {p: mean_std(np.nanmean(np.array(v), axis=1))[0] for p, v in spearman.items()}
    lines.append("- Spearman with the scores: " + ", ".join(f"{p} {v:.2f}" for p, v in spear.items())
                 + f" (paper, learned_iteration on CIFAR-100: {PAPER_SPEARMAN})"
                 + (f"; on digits {100 * np.mean(scores == 0):.0f}% of the scores are tied at exactly 0, which limits "
                    f"any rank correlation with them." if np.mean(scores == 0) > 0.1 else "."))
    ties = [(p, b) for (p, s, b) in results if s == "scores, random ties"]
    if ties:
        lines.append("- Ties: with the scores' ties broken at random instead of in dataset order, Acc "
                     + "; ".join(f"{p} at buffer {b} {fmt(acc[(p, 'scores, random ties', b)])} (dataset order "
                                 f"{fmt(acc[(p, 'scores', b)])})" for p, b in sorted(ties, key=lambda x: (x[1], x[0])))
                     + ".")
    typical_se = np.nanmedian([d[1] for d in diffs.values()]) if diffs else float("nan")
    lines.append(
        f"- Caveats: digits is tiny (about 290 training images per task; a buffer of {large} holds "
        f"{100 * large / len(scores):.0f}% of the training set and, at the end, {large // n_tasks} images of each "
        f"task), and {n_seeds} seeds give paired standard errors of about {typical_se:.1f} points; "
f"these runs say how the policies behave on this "
        f"small problem, not how they behave on CIFAR or ImageNet.")
    lines.append("")

    # reproduction
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " .venv/bin/python experiments/maer_digits.py"
    command += "".join(f" {a}" for a in sys.argv[1:])
    phases = "; ".join(f"{k} {v / 60:.1f} min" for k, v in runner.seconds.items())
    lines += ["## Reproduce", "", "```bash", command, "```", "",
              f"{runner.n_runs} main.py runs plus {1 + (len(args.seeds) if noisy_summary is not None else 0)} "
              f"split trainings, in one process, {elapsed / 60:.1f} min wall time ({phases}), started "
              f"{started_at:%Y-%m-%d %H:%M} UTC, git {git_commit()}. Machine: {machine()}; load average "
              f"{load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end. Every run is in the MLflow store "
              f"`{Path(args.out).name}/mlflow.db` of the output folder (experiment `maer_digits`; the split trainings "
              f"in `maer_digits-splits`).", ""]
    return "\n".join(lines)


def cli_main(argv: list[str] | None = None) -> int:
    run(parse_cli(argv))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
