"""Learners per hour of a stream plan (`train_splits.py --plan_kind stream`) against the same continual runs as
separate main.py processes, one at a time.

A stream plan's learner is main.py's continual run of one method (here er, buffer 200, on seq-digits) on a random
half of every task's training data, with its predictions stored after every task. The ways, each as real
subprocesses exactly as a user would start them, into a fresh temporary folder (store and MLflow database) each
round, with OMP_NUM_THREADS=1 (and MKL_NUM_THREADS=1):

- stream, one driver: `python train_splits.py --plan_kind stream --n_models K --subset_ratio 0.5 --cl_model er
  --buffer_size 200 --dataset seq-digits --lr 0.1 --n_epochs E --out <temp>/store --tracking_uri
  sqlite:///<temp>/m.db --non_verbose` (the default launcher: every learner in the driver's process);
- stream, pool of 2: the same with `--launcher pool --workers 2` (two worker processes);
- main.py one at a time: K runs of `python main.py --model er --buffer_size 200 --dataset seq-digits --lr 0.1
  --n_epochs E --seed S --tracking_uri sqlite:///<temp>/m.db --non_verbose 1 --no_figures`, seeds 0..K-1, one
  after another, all logging to the round's one database. main.py has no subset flag, so each of these runs trains
  on the full data: the row is the cost of the same protocol run one run at a time, not of the same examples (a
  main.py run sees twice a learner's examples per epoch, so its training steps are twice a learner's).

Wall time runs from starting a way's first process to the exit of its last; CPU time is the user + system time of
its processes (and anything they started), read from `os.wait4`. The ways alternate over --rounds rounds (the
order rotates each round), so background load favours none; the speed-up of a stream way is taken within a
round (main.py's wall time over the stream way's: the ratio of models per hour) and the table shows its median
and range.

Each run is checked: every process exits with 0; a stream driver prints "trained K models" and its store holds K
model files; the main.py runs leave one FINISHED MLflow run each. A benchmark, not a test: it prints a table and
says what failed; it never fails on a slow machine.

    .venv/bin/python benchmarks/stream_plan.py     # about 6 minutes on 2 cores shared with other jobs
"""
from __future__ import annotations

import argparse
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks.engine_throughput import load_average, machine  # noqa: E402

TRAINED = re.compile(r"^trained (\d+) models in ([\d.]+) s", re.MULTILINE)
WAYS = ("stream", "stream-pool", "main")
LABELS = {"stream": "stream plan, one driver (default launcher)",
          "stream-pool": "stream plan, one driver, --launcher pool --workers 2",
          "main": "main.py one at a time (full data, see the note)"}


@dataclass
class Run:
    way: str
    wall: float  # seconds from the first start to the last exit
    cpu: float  # user + system seconds of every process of the way
    problems: list[str]


def method_flags(cli: argparse.Namespace) -> list[str]:
    """The continual run both ways make: the method, its buffer, the dataset and the training settings."""
    return ["--buffer_size", str(cli.buffer_size), "--dataset", cli.dataset, "--lr", "0.1",
            "--n_epochs", str(cli.n_epochs)]


def run_process(command: list[str], log: Path) -> tuple[int, float, str]:
    """Run `command` from the repository root to its end: its exit code, CPU seconds (with its children), output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_utime + usage.ru_stime, log.read_text()


def tail(output: str) -> str:
    return " | ".join(output.strip().splitlines()[-3:])


def run_stream(cli: argparse.Namespace, folder: Path, pool: bool) -> Run:
    command = [sys.executable, str(ROOT / "train_splits.py"), "--plan_kind", "stream", "--out", str(folder / "store"),
               "--n_models", str(cli.n_models), "--subset_ratio", "0.5", "--cl_model", "er", *method_flags(cli),
               "--tracking_uri", f"sqlite:///{folder / 'm.db'}", "--non_verbose"]
    if pool:
        command += ["--launcher", "pool", "--workers", str(cli.workers)]
    start = time.perf_counter()
    code, cpu, output = run_process(command, folder / "driver.log")
    wall = time.perf_counter() - start
    problems = []
    found = TRAINED.search(output)
    if code != 0 or not found or int(found.group(1)) != cli.n_models:
        problems.append(f"the driver exited with {code}, " + (f"trained {found.group(1)} models" if found else
                        "without a 'trained N models' line") + f": {tail(output)}")
    stored = sorted((folder / "store" / "models").glob("model_*.npz")) if (folder / "store" / "models").is_dir() else []
    if len(stored) != cli.n_models:
        problems.append(f"the store holds {len(stored)} model files of {cli.n_models}")
    return Run("stream-pool" if pool else "stream", wall, cpu, problems)


def run_main(cli: argparse.Namespace, folder: Path) -> Run:
    """K main.py runs one after another, seeds 0..K-1, into one MLflow database."""
    start, cpu, problems = time.perf_counter(), 0.0, []
    for seed in range(cli.n_models):
        command = [sys.executable, str(ROOT / "main.py"), "--model", "er", *method_flags(cli), "--seed", str(seed),
                   "--tracking_uri", f"sqlite:///{folder / 'm.db'}", "--non_verbose", "1", "--no_figures"]
        code, seconds, output = run_process(command, folder / f"main{seed}.log")
        cpu += seconds
        if code != 0:
            problems.append(f"main.py --seed {seed} exited with {code}: {tail(output)}")
    wall = time.perf_counter() - start
    try:
        with sqlite3.connect(folder / "m.db") as connection:
            statuses = sorted(s for (s,) in connection.execute("select status from runs"))
    except sqlite3.Error as error:
        statuses = [f"unreadable ({error})"]
    if statuses != ["FINISHED"] * cli.n_models:
        problems.append(f"MLflow runs of the {cli.n_models} main.py runs: {statuses}")
    return Run("main", wall, cpu, problems)


def spread(values: list[float], digits: int = 1, unit: str = "") -> str:
    return f"{statistics.median(values):.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(rounds: list[dict[str, Run]], cli: argparse.Namespace) -> str:
    header = ("| way | wall s, min | wall s, median | models/hour (at the median) | CPU s per model, median "
              "| speed-up on main.py one at a time, median (range) | runs without a problem |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for way in cli.ways:
        runs = [r[way] for r in rounds]
        walls = [r.wall for r in runs]
        median = statistics.median(walls)
        ratio = (spread([r["main"].wall / r[way].wall for r in rounds], 2, "x")
                 if "main" in cli.ways and way != "main" else "1" if way == "main" else "-")
        lines.append(f"| {LABELS[way]} | {min(walls):.1f} | {median:.1f} | {cli.n_models * 3600 / median:.0f} "
                     f"| {statistics.median(r.cpu for r in runs) / cli.n_models:.2f} | {ratio} "
                     f"| {sum(not r.problems for r in runs)} of {len(runs)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default="seq-digits")
    parser.add_argument("--n_models", type=int, default=8, help="learners of the plan, main.py runs of the other way")
    parser.add_argument("--n_epochs", type=int, default=5, help="epochs per task")
    parser.add_argument("--buffer_size", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2, help="processes of the pool way")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each one run of every way")
    parser.add_argument("--keep", default=None, help="keep the stores, databases and logs under this folder")
    cli = parser.parse_args()
    print(f"machine: {machine()}; er (buffer {cli.buffer_size}) on {cli.dataset}, {cli.n_epochs} epochs, "
          f"{cli.n_models} models per way; OMP_NUM_THREADS=1; {cli.rounds} rounds; load average {load_average()}",
          flush=True)
    rounds, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(cli.keep) if cli.keep else Path(scratch)
        for index in range(cli.rounds):
            shift = index % len(cli.ways)
            order = cli.ways[shift:] + cli.ways[:shift]  # each way takes each place in turn
            runs = {}
            for way in order:
                folder = base / f"round{index}-{way}"
                folder.mkdir(parents=True)
                runs[way] = run = run_main(cli, folder) if way == "main" else run_stream(cli, folder, way == "stream-pool")
                print(f"  round {index}: {way} wall {run.wall:.1f} s, CPU {run.cpu:.1f} s; load average "
                      f"{load_average()}" + "".join(f"\n    PROBLEM: {p}" for p in run.problems), flush=True)
            rounds.append(runs)
    print(f"\n{time.perf_counter() - started:.0f} s in all; load average (1, 5, 15 min) at the end: {load_average()}")
    print(table(rounds, cli))
    if "main" in cli.ways:
        print("\nmain.py has no subset flag: its runs train on every task's full data, the learners on a random half; "
              "the main.py row is the cost of the same protocol run one run at a time, not of the same examples.")
    problems = [p for r in rounds for run in r.values() for p in run.problems]
    print("\nchecks: " + ("every process exited with 0, every store holds its K models, one FINISHED MLflow run "
                          "per main.py run" if not problems else f"{len(problems)} problem(s), listed above"))


if __name__ == "__main__":
    main()
