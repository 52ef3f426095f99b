"""Memorization inside the continual stream, forgetting by memorization, and single-run proxies against the estimator.

On the embedded seq-longtail (8x8 synthetic long tail whose singletons are known to need memorization) and
seq-digits (scikit-learn digits, here with 10% of the training labels relabeled within their task, so that some
examples can only be fitted by memorizing them), through the repository's own entry points:

  1. stream plans (`train_splits.py --plan_kind stream --cl_model er --buffer_size B`, 16 learners, each on a
     balanced half of every task; seq-longtail 10 epochs per task, seq-digits 5 and, as 5 leave the relabeled
     examples unfitted, 100) scored by `eval_splits.py` at every task boundary: memorization at the end of
     each example's own task against the end of the stream, the [T, T] mean per task, class-IL accuracy, and how
     well memorization finds the singletons (seq-longtail) or the relabeled examples (seq-digits);
  2. from the same evaluation: forgetting (accuracy of the learners that trained on an example at the end of its
     task minus at the end of the stream) of high- (>= 0.25) against low- (< 0.1) memorization examples, Welch's
     t-test, and the Spearman correlation of memorization with forgetting (the memorization-in-CL paper's claim);
  3. a stationary subset store per dataset (32 models on random halves, predictions after every epoch) scored with
     `eval_splits.py --proxies` (learned-late, cumulative loss, forgetting events, learned iteration of model 0
     against the estimator of the other 31) and, separately, `--lds_holdout 0.25` (the linear datamodeling score of
     the influence matrix on the last 8 models, held out of its computation).

Every run logs to <out>/mlflow.db; stores, score files and every run's printout (<out>/runs.log) are in <out>.
The numbers are kept in <out>/numbers.json and written as tables to experiments/stream_memorization_results.md
by experiments/stream_memorization_report.py. A rerun trains only what a store lacks.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/stream_memorization.py            # full: about 3 min on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python experiments/stream_memorization.py --quick    # smoke test, under 1 min
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # small MLPs run fastest single-threaded

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "experiments")]  # run as a script from anywhere

import eval_splits  # noqa: E402  (before numpy: it sets OpenBLAS's thread timeout)
import train_splits  # noqa: E402

import numpy as np  # noqa: E402

from memorization.store import SubsetStore  # noqa: E402
from memorization.estimator import influence  # noqa: E402
from memorization.lds import linear_datamodeling_score  # noqa: E402
from memorization.stream_eval import LOW_MEM, example_tasks, read_stream_store, stream_dataset, task_means  # noqa: E402
from stream_memorization_report import write_results  # noqa: E402  (beside this file)

DATASETS = ("seq-longtail", "seq-digits")
HIGH_MEM = 0.25  # eval_splits.py's --mem_threshold default, the high bucket of its forgetting comparison


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "stream_memorization"))
    parser.add_argument("--results", default=str(REPO / "experiments" / "stream_memorization_results.md"))
    parser.add_argument("--seed", type=int, default=0, help="plan seed: masks, learner seeds, label noise")
    parser.add_argument("--learners", type=int, default=16, help="learners per stream plan")
    parser.add_argument("--subset_ratio", type=float, default=0.5)
    parser.add_argument("--buffers", default="50,500", help="ER buffer sizes")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--longtail_epochs", type=int, default=10, help="epochs per task of seq-longtail learners")
    parser.add_argument("--digits_epochs", type=int, default=5, help="epochs per task of seq-digits learners")
    parser.add_argument("--digits_fit_epochs", type=int, default=100,
                        help="a second seq-digits stream setting with this many epochs per task (the stationary "
                             "store's epochs), as 5 leave the relabeled examples unfitted; 0: none")
    parser.add_argument("--digits_noise", type=float, default=0.1, help="--label_noise of every seq-digits run")
    parser.add_argument("--subset_models", type=int, default=32, help="models of each stationary subset store")
    parser.add_argument("--longtail_subset_epochs", type=int, default=10)
    parser.add_argument("--digits_subset_epochs", type=int, default=100)
    parser.add_argument("--digits_subset_hidden", default="256", help="--mlp_hidden of the seq-digits subset store")
    parser.add_argument("--lds_holdout", type=float, default=0.25)
    parser.add_argument("--proxy_boot", type=int, default=1000, help="bootstrap resamples of the proxy intervals")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 4 learners, 2 / 1 epochs per task, 8-model subset stores of 3 / 10 epochs, "
                             "200 bootstrap resamples; writes only into <out>_quick")
    args = parser.parse_args(argv)
    if args.quick:
        args.learners, args.longtail_epochs, args.digits_epochs, args.digits_fit_epochs = 4, 2, 1, 2
        args.subset_models, args.longtail_subset_epochs, args.digits_subset_epochs = 8, 3, 10
        args.proxy_boot = 200
        args.out = args.out + "_quick"
        args.results = str(Path(args.out) / "results.md")
    args.buffers = [int(b) for b in args.buffers.split(",")]
    args.out = str(Path(args.out).resolve())
    return args


class Runner:
    """Calls the entry points in-process, their printout appended to <out>/runs.log, and times each call."""

    def __init__(self, args: argparse.Namespace):
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tracking = ["--tracking_uri", f"sqlite:///{self.out / 'mlflow.db'}",
                         "--experiment_name", "stream_memorization"]
        self.log = open(self.out / "runs.log", "a")
        self.seconds: dict[str, float] = {}

    def call(self, name: str, program: str, argv: list[str]):
        self.log.write(f"\n$ {program} {' '.join(argv)}\n")
        self.log.flush()
        started = time.perf_counter()
        with contextlib.redirect_stdout(self.log), contextlib.redirect_stderr(self.log):
            if program == "train_splits.py":
                result = train_splits.run_plan(train_splits.parse_args(argv))
            else:
                result = eval_splits.score_store(eval_splits.parse_args(argv))
        self.log.flush()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        print(f"  {name}: {self.seconds[name]:.0f} s", flush=True)
        return result


def dataset_flags(args: argparse.Namespace, dataset: str) -> list[str]:
    noise = ["--label_noise", str(args.digits_noise)] if dataset == "seq-digits" else []
    return ["--dataset", dataset, *noise]


def stream_study(runner: Runner, args: argparse.Namespace, dataset: str, buffer: int, epochs: int) -> dict:
    """One stream plan (ER, `buffer`) trained and scored at every task boundary; the numbers of tables 1 and 2."""
    name = f"{dataset}-er{buffer}-e{epochs}"
    store = runner.out / "stream" / name
    trained = runner.call(f"train {name}", "train_splits.py", [
        "--plan_kind", "stream", "--cl_model", "er", "--buffer_size", str(buffer), "--n_models", str(args.learners),
        "--subset_ratio", str(args.subset_ratio), *dataset_flags(args, dataset), "--lr", str(args.lr),
        "--n_epochs", str(epochs), "--seed", str(args.seed), "--out", str(store), "--non_verbose", *runner.tracking])
    result = runner.call(f"score {name}", "eval_splits.py", [
        "--run_dir", str(store), "--out", str(runner.out / "stream" / f"{name}_scores" / "mem.npy"),
        *runner.tracking])
    plan = SubsetStore(store).load_plan()
    data = stream_dataset(plan, str(REPO / "data"))  # both datasets are embedded: nothing is read
    tasks = example_tasks(data)
    mem, forgetting, summary = result["mem_tasks"], result["forgetting"], result["summary"]
    # The examples that must be memorized: the singletons of seq-longtail, the relabeled examples of seq-digits.
    known = data.known_answer()
    positives = known["singleton"] if known is not None else plan.noisy_mask
    own = forgetting["mem_own"]
    # Accuracy at the end of each example's own task of the learners with it and of those without it.
    stored = read_stream_store(SubsetStore(store), plan, "correct", allow_partial=False)
    at_own = stored["correct"][tasks, :, np.arange(len(tasks))].T  # [K, n]
    with_it = (at_own * stored["mask"]).sum(0) / stored["mask"].sum(0)
    without = (at_own * ~stored["mask"]).sum(0) / (~stored["mask"]).sum(0)
    high = forgetting["earlier"] & (own >= HIGH_MEM)
    low = forgetting["earlier"] & (own < LOW_MEM)

    def mean(values, where):
        return float(np.nanmean(values[where])) if where.any() else float("nan")

    return {"dataset": dataset, "buffer": buffer, "epochs": epochs, "trained": trained["trained"],
            "n_train": int(plan.settings["n_train"]), "n_tasks": int(plan.settings["n_tasks"]),
            "summary": summary, "task_means": task_means(mem, tasks).tolist(),
            "positives": int(positives.sum()), "positive_kind": "singleton" if known is not None else "relabeled",
            "positive_mem_own": mean(own, positives), "positive_mem_end": mean(mem[-1], positives),
            "positive_acc_with": mean(with_it, positives), "positive_acc_without": mean(without, positives),
            "other_acc_with": mean(with_it, ~positives), "other_acc_without": mean(without, ~positives),
            "other_mem_own": mean(own, ~positives), "other_mem_end": mean(mem[-1], ~positives),
            "high_acc_own": mean(forgetting["accuracy_own"], high),
            "high_acc_end": mean(forgetting["accuracy_final"], high),
            "low_acc_own": mean(forgetting["accuracy_own"], low),
            "low_acc_end": mean(forgetting["accuracy_final"], low),
            "high_positive_share": mean(positives.astype(float), high)}


def proxy_study(runner: Runner, args: argparse.Namespace, dataset: str) -> dict:
    """A stationary subset store with a record after every epoch, scored with --proxies and, apart, by LDS."""
    name = f"{dataset}-subsets"
    store = runner.out / "subsets" / name
    epochs = args.longtail_subset_epochs if dataset == "seq-longtail" else args.digits_subset_epochs
    hidden = ["--mlp_hidden", args.digits_subset_hidden] if dataset == "seq-digits" else []
    trained = runner.call(f"train {name}", "train_splits.py", [
        *dataset_flags(args, dataset), "--n_models", str(args.subset_models), "--subset_ratio", str(args.subset_ratio),
        "--lr", str(args.lr), "--batch_size", "32", "--n_epochs", str(epochs), *hidden,
        "--record_epochs", ",".join(str(e) for e in range(1, epochs + 1)), "--ensemble", "16",
        "--seed", str(args.seed), "--out", str(store), "--non_verbose", *runner.tracking])
    scores = runner.out / "subsets" / f"{name}_scores"
    full = runner.call(f"score {name} --proxies", "eval_splits.py", [
        "--run_dir", str(store), "--out", str(scores / "mem.npy"), "--proxies", "--proxy_boot", str(args.proxy_boot),
        *runner.tracking])
    held = runner.call(f"score {name} --lds_holdout", "eval_splits.py", [
        "--run_dir", str(store), "--out", str(scores / "lds.npy"), "--lds_holdout", str(args.lds_holdout),
        *runner.tracking])
    table = (scores / "mem_proxies.md").read_text()
    rows = json.loads((scores / "mem_proxies.json").read_text())
    groups = [json.loads(p.read_text()) for p in sorted((store / "timing").glob("group_*.json"))]
    summary, lds = full["summary"], held["summary"]
    train_acc = None
    per_epoch = scores / "mem_report" / "per_epoch.csv"
    if per_epoch.exists():  # the share of (model, included example) pairs fitted after the last epoch
        last = per_epoch.read_text().strip().splitlines()[-1].split(",")
        train_acc = float(last[4])
    return {"dataset": dataset, "epochs": epochs, "hidden": args.digits_subset_hidden if hidden else "100,100",
            "trained": trained["trained"], "n_models": summary["n_models"], "mean": summary["mean"],
            "fraction_memorized": summary["fraction_memorized"],
            "auroc": summary.get("auroc_singleton", summary.get("auroc_relabeled")),
            "auroc_kind": "singletons" if "auroc_singleton" in summary else "relabeled",
            "lds": lds.get("lds_influence"), "lds_defined": lds.get("lds_influence_defined"),
            "lds_models": lds.get("lds_models"), "lds_scored_models": lds["n_models"],
            "lds_in_sample": in_sample_lds(store, lds["n_models"], scores / "in_sample_influence.npy"),
            "proxy_table": table.split("\n\n", 2)[-1].strip(), "proxy_note": table.split("\n\n", 2)[1].strip(),
            "proxy_rows": rows, "group_seconds": [(len(g["model_ids"]), g["seconds"]) for g in groups],
            "train_acc_last_epoch": train_acc}


def in_sample_lds(store: Path, n_fit: int, scratch: Path) -> float:
    """The LDS of the influence matrix of the first `n_fit` models on those same models: what --lds_holdout's
    held-out value is read against (an attribution always predicts the models it was computed from better)."""
    plan = SubsetStore(store).load_plan()
    targets = np.stack([SubsetStore(store).read_model(i, plan)["prob_test"][-1] for i in range(n_fit)]).astype(
        np.float32)
    masks = plan.inclusion_mask[:n_fit]
    influence(masks, targets, topk=1, threshold=1.0, full_path=scratch)
    value = linear_datamodeling_score(np.nan_to_num(np.load(scratch)), masks, targets)["lds"]
    scratch.unlink()
    return float(value)


def main(argv: list[str] | None = None) -> None:
    args = parse_cli(argv)
    started = time.time()
    load_start = os.getloadavg()
    runner = Runner(args)
    print(f"stream memorization study into {runner.out} (printout of every run: {runner.out / 'runs.log'})")
    settings = [("seq-longtail", args.longtail_epochs), ("seq-digits", args.digits_epochs)]
    settings += [("seq-digits", args.digits_fit_epochs)] if args.digits_fit_epochs else []
    streams = [stream_study(runner, args, d, b, e) for d, e in settings for b in args.buffers]
    proxies = [proxy_study(runner, args, d) for d in DATASETS]
    numbers = {"argv": sys.argv[1:] if argv is None else argv, "settings": vars(args), "streams": streams,
               "proxies": proxies, "seconds": runner.seconds, "total_seconds": time.time() - started,
               "load_start": load_start, "load_end": os.getloadavg()}
    (runner.out / "numbers.json").write_text(json.dumps(numbers, indent=1, default=float))
    text = write_results(numbers, Path(args.results))
    print(text)


if __name__ == "__main__":
    main()
