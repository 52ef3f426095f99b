"""What a sweep cell costs against the same run made directly with main.py.

Straightforward: `continual.run.run` logging itself into a SQLite MLflow store (what a sweep of shell-launched
main.py runs would do, each process writing to the store). Ours: the sweep's worker (`run_cell`:
continual.run.run with a RecordingLogger, a checkpoint after every task, figures drawn once after the last
task) and then the driver writing the record into the store (`RunLogger.replay`: params, metrics in
batches of 1000, artifacts in one call). Both train the same configuration with the same seed;
the table shows the median wall time of each over `--repeats` alternating rounds, ours split into
worker and driver time, and the ratio ours / straightforward. A fresh store per measurement.

A benchmark, not a test: it prints a table and never fails on a slow machine.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sweep_overhead.py     # about 3 min on 2 CPU cores
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continual import run as main_py  # noqa: E402
from benchmarks.engine_throughput import load_average, machine  # noqa: E402
from continual.args import parse_args  # noqa: E402
from utils.mlflow_logger import RunLogger  # noqa: E402
from continual.sweep_runs import run_cell  # noqa: E402

CASES = {
    "seq-digits 5 tasks x 1 epoch": ["--dataset", "seq-digits", "--model", "sgd", "--n_epochs", "1",
                                     "--lr", "0.1", "--batch_size", "32"],
    "random-label-digits 20 tasks x 10 epochs": ["--dataset", "random-label-digits", "--model", "sgd",
                                                 "--n_tasks", "20", "--n_epochs", "10", "--optimizer", "adam",
                                                 "--lr", "1e-3", "--batch_size", "50", "--plasticity", "redo",
                                                 "--redo_every", "200"],
}


def straightforward(argv: list[str], folder: Path) -> float:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # main.py's tables; the sweep's worker hides them too
        main_py.run(parse_args([*argv, "--non_verbose", "--tracking_uri", f"sqlite:///{folder / 'mlflow.db'}"]))
    return time.perf_counter() - start


def ours(argv: list[str], folder: Path) -> tuple[float, float]:
    start = time.perf_counter()
    result = run_cell("cell", argv, str(folder / "checkpoints"))
    worker = time.perf_counter() - start
    start = time.perf_counter()
    RunLogger(f"sqlite:///{folder / 'mlflow.db'}", "sweep", "cell").replay(result["record"])
    return worker, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}; load average before: {load_average()}")
    header = ("| case | straightforward s | ours: worker s | ours: driver s | ours total s | ours / straightforward "
              "| range |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for name, argv in CASES.items():
        argv = [*argv, "--seed", "0"]
        direct, worker, driver, ratios = [], [], [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
                direct.append(straightforward(argv, Path(a)))
                w, d = ours(argv, Path(b))
                worker.append(w)
                driver.append(d)
                ratios.append((w + d) / direct[-1])
        total = statistics.median(w + d for w, d in zip(worker, driver))
        lines.append(f"| {name} | {statistics.median(direct):.2f} | {statistics.median(worker):.2f} | "
                     f"{statistics.median(driver):.2f} | {total:.2f} | {statistics.median(ratios):.2f} | "
                     f"{min(ratios):.2f}-{max(ratios):.2f} |")
    print("\n".join(lines))
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
