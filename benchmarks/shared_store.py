"""Two train_splits.py drivers sharing one store against one driver alone, for the same plan.

Each configuration runs as real subprocesses, exactly as a user would start them:

    python train_splits.py <plan flags> --out <temp>/store --tracking_uri sqlite:///<temp>/m.db --non_verbose

with OMP_NUM_THREADS=1 (and MKL_NUM_THREADS=1), into a fresh temporary folder each time. "alone" is one
driver; "shared" runs --drivers drivers on the same store and MLflow database, which split the plan's
groups through their claims (memorization/claims.py). The others start as soon as the first has opened
its MLflow run (its record appears in <store>/drivers/): drivers that create a fresh SQLite MLflow
database at the same instant race in MLflow's schema migration, and one can fail (--together starts
them at once, to see it: one driver of two failed in one of two tries here). Wall time runs from
starting the first driver to the exit of the last; CPU time is the user + system time of the drivers
(and anything they started), read from `os.wait4` for each child. The configurations alternate over
--repeats rounds (alone first in even rounds, shared first in odd ones), so background load favours
neither; ratios are taken within a round, and the table shows their median and range.

Each run is checked: every driver exits with 0, the counts on their "trained N models" lines sum to the
plan's size (no group trained twice, none left out), the store holds exactly one readable file per
model and nothing else (no claim, temporary or set-aside file left), each model file is the same bytes
as the one-driver run of the same round wrote, and the MLflow database holds one FINISHED run per
driver. A benchmark, not a test: it prints a table and says what failed; it never fails on a slow
machine.

    .venv/bin/python benchmarks/shared_store.py     # 12 minutes on 2 cores shared with other jobs (load 3-6)
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
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks.engine_throughput import load_average, machine  # noqa: E402
from memorization.store import SubsetStore  # noqa: E402

TRAINED = re.compile(r"^trained (\d+) models in ([\d.]+) s", re.MULTILINE)


@dataclass
class Run:
    drivers: int
    wall: float  # seconds from the first start to the last exit
    cpu: float  # user + system seconds of all drivers
    trained: list[int]  # per driver, from its "trained N models" line
    driver_walls: list[float]  # seconds from the first start to each driver's exit
    driver_starts: list[float]  # seconds from the first start to each driver's start
    files: dict[int, bytes] = field(repr=False)  # model id → the bytes of its file
    store_problems: list[str]  # whatever breaks "every model stored exactly once"
    problems: list[str]  # everything else: exit codes, MLflow runs

    @property
    def all_problems(self) -> list[str]:
        return self.store_problems + self.problems


def driver_command(cli: argparse.Namespace, folder: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train_splits.py"), "--dataset", cli.dataset, "--backbone", "mlp",
            "--mlp_hidden", cli.mlp_hidden, "--n_models", str(cli.n_models), "--n_epochs", str(cli.n_epochs),
            "--lr", "0.1", "--batch_size", str(cli.batch_size), "--subset_ratio", "0.5",
            "--ensemble", str(cli.ensemble), "--device", "cpu", "--data_path", str(folder / "data"),
            "--out", str(folder / "store"), "--tracking_uri", f"sqlite:///{folder / 'm.db'}", "--non_verbose"]


class Drivers:
    """Driver subprocesses, reaped with os.wait4 so that each one's CPU time is known."""

    def __init__(self, command: list[str], folder: Path):
        self.command, self.folder = command, folder
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.start = time.perf_counter()
        self.processes, self.handles, self.started, self.ended, self.codes = [], [], [], {}, {}
        self.cpu = 0.0

    def launch(self) -> None:
        handle = (self.folder / f"driver{len(self.processes)}.log").open("w")
        self.handles.append(handle)
        self.started.append(time.perf_counter() - self.start)
        self.processes.append(subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=handle,
                                               stderr=subprocess.STDOUT))

    def reap(self, block: bool) -> None:
        """Collect every driver that has ended (with `block`, wait until all have)."""
        for i, process in enumerate(self.processes):
            if i in self.codes:
                continue
            pid, status, usage = os.wait4(process.pid, 0 if block else os.WNOHANG)
            if pid == 0:
                continue
            self.ended[i] = time.perf_counter() - self.start
            self.cpu += usage.ru_utime + usage.ru_stime  # the driver and anything it started and waited for
            self.codes[i] = process.returncode = os.waitstatus_to_exitcode(status)
        if block:
            for handle in self.handles:
                handle.close()


def run_drivers(cli: argparse.Namespace, drivers: int, folder: Path) -> Run:
    """Start `drivers` drivers on one fresh store (see --together), wait for all, and check what they left."""
    group = Drivers(driver_command(cli, folder), folder)
    group.launch()
    if drivers > 1 and not cli.together:  # the others once the first has opened its MLflow run
        while not list((folder / "store" / "drivers").glob("*.json")) and 0 not in group.codes:
            time.sleep(0.05)
            group.reap(block=False)
    for _ in range(drivers - 1):
        group.launch()
    group.reap(block=True)
    codes, walls = [group.codes[i] for i in range(drivers)], [group.ended[i] for i in range(drivers)]
    cpu, wall = group.cpu, max(walls)
    logs = [folder / f"driver{i}.log" for i in range(drivers)]
    outputs = [log.read_text() for log in logs]
    problems, trained = [], []
    for i, (code, output) in enumerate(zip(codes, outputs)):
        found = TRAINED.search(output)
        trained.append(int(found.group(1)) if found else 0)
        if code != 0 or not found:
            tail = " | ".join(output.strip().splitlines()[-3:])
            problems.append(f"driver {i} of {drivers} exited with {code}" + ("" if found else " without a "
                            "'trained N models' line") + f": {tail}")
    problems += check_mlflow(folder / "m.db", drivers)
    store = SubsetStore(folder / "store")
    files = {m: store.model_path(m).read_bytes() for m in range(cli.n_models) if store.model_path(m).exists()}
    stored_once = check_store(folder / "store", cli.n_models, sum(trained))
    return Run(drivers, wall, cpu, trained, walls, group.started, files, stored_once, problems)


def check_store(folder: Path, n_models: int, trained: int) -> list[str]:
    """Sentences for whatever breaks 'every model stored exactly once'."""
    problems = []
    if trained != n_models:
        problems.append(f"the drivers trained {trained} models in all, the plan has {n_models}")
    store = SubsetStore(folder)
    try:
        plan = store.load_plan()
    except Exception as error:  # no plan written: a driver failed before it
        return problems + [f"no readable plan in the store ({error})"]
    finished, unreadable = store.finished_models(plan)
    if finished != list(range(n_models)):
        problems.append(f"{len(finished)} readable model files of {n_models}; missing: "
                        f"{sorted(set(range(n_models)) - set(finished))}")
    problems += unreadable
    extra = sorted(p.name for p in store.models_dir.iterdir() if not re.fullmatch(r"model_\d{6}\.npz", p.name))
    claims = sorted(p.name for p in (folder / "claims").glob("*")) if (folder / "claims").is_dir() else []
    if extra:
        problems.append(f"other files among the models: {', '.join(extra)}")
    if claims:
        problems.append(f"claims left behind: {', '.join(claims)}")
    return problems


def check_mlflow(database: Path, drivers: int) -> list[str]:
    """A sentence unless the MLflow database holds exactly one FINISHED run per driver."""
    try:
        with sqlite3.connect(database) as connection:
            statuses = sorted(s for (s,) in connection.execute("select status from runs"))
    except sqlite3.Error as error:
        return [f"MLflow database {database.name}: {error}"]
    if statuses != ["FINISHED"] * drivers:
        return [f"MLflow runs of {drivers} driver(s): {statuses}"]
    return []


def spread(values: list[float], digits: int = 1, unit: str = "") -> str:
    return (f"{statistics.median(values):.{digits}f}{unit} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def table(rounds: list[tuple[Run, Run]], cli: argparse.Namespace) -> str:
    alone, shared = [a for a, _ in rounds], [s for _, s in rounds]
    cpu_ratio = [s.cpu / a.cpu for a, s in rounds]
    wall_ratio = [s.wall / a.wall for a, s in rounds]
    same_bytes = [sum(m in a.files and s.files.get(m) == a.files[m] for m in range(cli.n_models)) for a, s in rounds]
    header = ("| configuration | wall s | CPU s (user+sys, all drivers) | CPU vs alone | wall vs alone "
              "| models trained by each driver | every model stored once | model files the same bytes as alone |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, runs in (("1 driver alone", alone), (f"{cli.drivers} drivers sharing one store", shared)):
        is_shared = runs is shared
        lines.append(
            f"| {name} | {spread([r.wall for r in runs])} | {spread([r.cpu for r in runs])} "
            f"| {spread(cpu_ratio, 2, 'x') if is_shared else '1'} | {spread(wall_ratio, 2, 'x') if is_shared else '1'} "
            f"| {'; '.join(' + '.join(map(str, r.trained)) + f' = {sum(r.trained)}' for r in runs)} "
            f"| {sum(not r.store_problems for r in runs)} of {len(runs)} runs "
            f"| {', '.join(f'{n} of {cli.n_models}' for n in same_bytes) if is_shared else '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default="seq-digits")
    parser.add_argument("--mlp_hidden", default="256")
    parser.add_argument("--n_models", type=int, default=16)
    parser.add_argument("--n_epochs", type=int, default=100,
                        help="epochs of each model; the default makes one driver alone take about a minute here")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--ensemble", type=int, default=2,
                        help="models per group: the plan's unit of work, which the drivers share out")
    parser.add_argument("--drivers", type=int, default=2, help="drivers sharing the store")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, each one run of both configurations")
    parser.add_argument("--together", action="store_true",
                        help="start all drivers at the same instant; by default the others start once the first "
                             "has opened its MLflow run, because drivers that create a fresh SQLite MLflow "
                             "database at the same time race in MLflow's schema migration and one can fail")
    parser.add_argument("--keep", default=None, help="keep the stores and logs under this folder")
    cli = parser.parse_args()
    print(f"machine: {machine()}; {cli.dataset}, mlp {cli.mlp_hidden}, {cli.n_models} models in groups of "
          f"{cli.ensemble}, {cli.n_epochs} epochs; drivers OMP_NUM_THREADS=1; {cli.repeats} rounds; "
          f"load average {load_average()}", flush=True)
    rounds, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(cli.keep) if cli.keep else Path(scratch)
        for repeat in range(cli.repeats):
            order = [1, cli.drivers] if repeat % 2 == 0 else [cli.drivers, 1]
            runs = {}
            for drivers in order:
                folder = base / f"round{repeat}-{drivers}drivers"
                folder.mkdir(parents=True)
                runs[drivers] = run = run_drivers(cli, drivers, folder)
                print(f"  round {repeat}: {drivers} driver(s) wall {run.wall:.1f} s, CPU {run.cpu:.1f} s, trained "
                      f"{' + '.join(map(str, run.trained))}, drivers ran "
                      f"{', '.join(f'{a:.1f}-{b:.1f}' for a, b in zip(run.driver_starts, run.driver_walls))} s; "
                      f"load average {load_average()}"
                      + "".join(f"\n    PROBLEM: {p}" for p in run.all_problems), flush=True)
            rounds.append((runs[1], runs[cli.drivers]))
    print(f"\n{time.perf_counter() - started:.0f} s in all; load average (1, 5, 15 min) at the end: {load_average()}")
    print(table(rounds, cli))
    problems = [p for a, s in rounds for p in a.all_problems + s.all_problems]
    print("\nchecks: " + ("every driver exited cleanly, the counts sum to the plan, every model is stored exactly "
                          "once, one FINISHED MLflow run per driver" if not problems else f"{len(problems)} "
                          "problem(s), listed above"))


if __name__ == "__main__":
    main()
