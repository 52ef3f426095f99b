"""A sweep from start to end: search cells, selection per method, final cells, the comparison report.

Cells run on a launcher; the driver alone records them in MLflow (continual/sweep_runs.py).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from continual.sweep_runs import SweepTracker, run_cell
from continual.sweep_spec import Cell, Sweep, load_sweep
from utils.errors import ConfigError
from utils.launchers import check_launcher, pool_workers, run_jobs
from utils.mlflow_logger import check_reachable, default_tracking_uri

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Choice:
    """The selection of one method: every configuration's search score and the one chosen."""

    method: str
    scores: list[tuple[dict, float]]  # (configuration, mean selection metric over the search seeds; NaN: failed)
    config: dict | None  # None while search cells are missing
    missing: int  # search cells not finished yet


def final_value(run, metric: str) -> float:
    """The metric after the last task of a finished run; NaN for a diverged run."""
    if run is None or run.info.status != "FINISHED":
        return math.nan
    return float(run.data.metrics.get(metric, math.nan))


def choose(sweep: Sweep, method: str, chosen: dict[str, dict], runs: dict) -> Choice:
    """The configuration with the best mean selection metric over the search seeds (the first on ties)."""
    scores, missing = [], 0
    for config in sweep.methods[method].configurations(chosen):
        cells = sweep.cells(method, config, sweep.search_seeds)
        missing += sum(cell.key not in runs for cell in cells)
        values = [final_value(runs.get(cell.key), sweep.metric) for cell in cells]
        scores.append((config, float(np.mean(values)) if all(map(math.isfinite, values)) else math.nan))
    if missing:
        return Choice(method, scores, None, missing)
    best = None
    for config, score in scores:
        if math.isfinite(score) and (best is None or sweep.better(score, best[1])):
            best = (config, score)
    if best is None:
        raise ConfigError(f"every configuration of method {method} diverged or did not log {sweep.metric}; "
                          f"change its grid (e.g. smaller learning rates) and run the sweep again")
    return Choice(method, scores, best[0], 0)


def execute(cells: list[tuple[Cell, str]], tracker: SweepTracker, args: argparse.Namespace, out: Path) -> int:
    """Run the cells that have not finished; the driver writes each result to MLflow as it arrives."""
    unique: dict[str, tuple[Cell, str]] = {}
    for cell, phase in cells:
        unique.setdefault(cell.key, (cell, phase))
    todo = []
    for key, (cell, phase) in unique.items():
        if key in tracker.runs:
            tracker.adopt(tracker.runs[key])
        else:
            todo.append(cell)
    print(f"{len(unique) - len(todo)} of {len(unique)} cells already finished; running {len(todo)}", flush=True)
    threads = max(1, (os.cpu_count() or 1) // pool_workers(args)) if args.launcher == "pool" else None
    checkpoints = out / "checkpoints"
    jobs = [(cell.key, cell.argv(), str(checkpoints), threads) for cell in todo]
    failures = []
    # A failed cell (a missing dataset, a bug) most likely fails the others alike: start no more.
    results = run_jobs(run_cell, jobs, args, out / "launcher", stop=lambda result: result["outcome"] == "error")
    for count, result in enumerate(results, 1):
        cell, phase = unique[result["key"]]
        if result["outcome"] == "error":
            failures.append((cell, result["error"]))
            if "\n" in result["error"]:  # a traceback (a bug, not bad input): shown whole
                print(f"{cell.run_name}: {result['error']}", file=sys.stderr, flush=True)
            continue
        tracker.runs[cell.key] = tracker.log_cell(cell, phase, result)
        (checkpoints / f"{cell.key}.pt").unlink(missing_ok=True)
        value = final_value(tracker.runs[cell.key], tracker.sweep.metric)
        print(f"[{count}/{len(todo)}] {cell.run_name}: {result['outcome']}, {tracker.sweep.metric} {value:.2f} "
              f"({result['seconds']:.0f} s)", flush=True)
    if failures:
        cell, error = failures[0]
        raise ConfigError(f"cell {cell.run_name} failed ({error.splitlines()[0]}), and no further cell was "
                          f"started; fix that and run the sweep again, which runs only the unfinished cells")
    return len(todo)


def run_sweep(args: argparse.Namespace) -> dict:
    """Check the sweep file, run its missing cells, choose per method, run the finals, write the report."""
    from continual.sweep_report import write_report

    sweep = load_sweep(args.sweep_file)  # every check of the file happens here, before anything runs
    check_launcher(args)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    check_reachable(tracking_uri)
    out = Path(args.out) if args.out else REPO_ROOT / "sweeps" / "results" / sweep.name
    tracker = SweepTracker(tracking_uri, sweep)
    tracker.load()
    if args.report_only:
        tracker.open_parent(create=False)
    else:
        print(tracker.open_parent(), flush=True)
        overlap = sorted(set(sweep.search_seeds) & set(sweep.final_seeds))
        if overlap:
            print(f"warning: final seeds {overlap} are also search seeds; their final numbers are the runs the "
                  f"selection saw, which biases them upward", flush=True)

    ran = 0
    choices: dict[str, Choice] = {}
    chosen: dict[str, dict] = {}
    try:
        finals: list[tuple[Cell, str]] = []
        for stage in sweep.stages():
            stage = [m for m in stage if all(r in chosen for r in sweep.methods[m].reuse)]
            if not args.report_only:
                search = [(cell, "search") for m in stage for cell in sweep.search_cells(m, chosen)]
                ran += execute(search + finals, tracker, args, out)
            for method in stage:
                choices[method] = choice = choose(sweep, method, chosen, tracker.runs)
                if choice.config is not None:
                    chosen[method] = choice.config
                    tracker.record_choice(method, choice.config)
            finals = [(cell, "final") for m in stage if m in chosen
                      for cell in sweep.cells(m, chosen[m], sweep.final_seeds)]
        if not args.report_only:
            ran += execute(finals, tracker, args, out)
        report = write_report(sweep, choices, tracker, out)
    except BaseException as error:
        if not args.report_only:  # a report leaves the parent's status as the sweep left it
            tracker.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    if not args.report_only:
        tracker.finish("FINISHED")
    print(report["text"])
    print(f"report: {out}", flush=True)
    return {"ran": ran, "parent_run_id": tracker.parent.run_id, "chosen": chosen, "report": report}
