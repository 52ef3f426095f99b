"""A sweep from start to end: search cells, selection per method, final cells, the comparison report.

Cells run on a launcher; the driver alone records them in MLflow (continual/sweep_runs.py).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from continual.sweep_runs import SweepTracker, run_cell
from continual.sweep_spec import Cell, Sweep, load_sweep
from utils.claims import Claims
from utils.errors import ConfigError
from utils.launchers import POLL_SECONDS, check_launcher, pool_workers, run_jobs
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


def execute(cells: list[tuple[Cell, str]], tracker: SweepTracker, args: argparse.Namespace, out: Path,
            claims: Claims) -> int:
    """Run the cells that have not finished; the driver writes each result to MLflow as it arrives.

    Drivers of one sweep (sharing its --out) claim each cell before running it, and wait for the cells that
    another live driver runs; a cell whose driver died is taken over, from its checkpoint."""
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
    ran, waiting_told = 0, False
    while todo:
        ran_now, elsewhere = _run_claimed(todo, unique, tracker, args, out, claims)
        ran += ran_now
        if elsewhere:
            tracker.load()  # the cells other drivers logged
        todo = [cell for cell in elsewhere if cell.key not in tracker.runs]
        if todo:
            if not waiting_told:
                print(f"waiting for {len(todo)} cells that another driver of this sweep runs", flush=True)
                waiting_told = True
            time.sleep(min(POLL_SECONDS, args.claim_timeout / 4))
    return ran


def _run_claimed(todo: list[Cell], unique: dict[str, tuple[Cell, str]], tracker: SweepTracker,
                 args: argparse.Namespace, out: Path, claims: Claims) -> tuple[int, list[Cell]]:
    """Run the cells of `todo` this driver can claim; returns how many ran and the cells another driver holds."""
    threads = max(1, (os.cpu_count() or 1) // pool_workers(args)) if args.launcher == "pool" else None
    checkpoints = out / "checkpoints"
    elsewhere, running = [], set()

    def jobs():
        for cell in todo:
            if not claims.claim(cell.key):
                elsewhere.append(cell)  # another live driver runs it
            elif tracker.finished(cell.key):  # logged by another driver meanwhile
                claims.release(cell.key)
            else:
                running.add(cell.key)
                yield cell.key, cell.argv(), str(checkpoints), threads

    failures, count = [], 0
    try:
        # A failed cell (a missing dataset, a bug) most likely fails the others alike: start no more.
        for result in run_jobs(run_cell, jobs(), args, out / "launcher", stop=lambda r: r["outcome"] == "error"):
            cell, phase = unique[result["key"]]
            count += 1
            if result["outcome"] == "error":
                failures.append((cell, result["error"]))
                if "\n" in result["error"]:  # a traceback (a bug, not bad input): shown whole
                    print(f"{cell.run_name}: {result['error']}", file=sys.stderr, flush=True)
            else:
                tracker.runs[cell.key] = tracker.log_cell(cell, phase, result)
                (checkpoints / f"{cell.key}.pt").unlink(missing_ok=True)
                value = final_value(tracker.runs[cell.key], tracker.sweep.metric)
                print(f"[{count}/{len(todo)}] {cell.run_name}: {result['outcome']}, {tracker.sweep.metric} "
                      f"{value:.2f} ({result['seconds']:.0f} s)", flush=True)
            running.discard(cell.key)
            claims.release(cell.key)
    finally:
        for key in running:  # unfinished: free for another driver (or this one's next run) now
            claims.release(key)
    if failures:
        cell, error = failures[0]
        raise ConfigError(f"cell {cell.run_name} failed ({error.splitlines()[0]}), and no further cell was "
                          f"started; fix that and run the sweep again, which runs only the unfinished cells")
    return count, elsewhere


def run_sweep(args: argparse.Namespace) -> dict:
    """Check the sweep file, run its missing cells, choose per method, run the finals, write the report."""
    from continual.sweep_report import write_report

    sweep = load_sweep(args.sweep_file)  # every check of the file happens here, before anything runs
    check_launcher(args)
    if not args.claim_timeout > 0:
        raise ConfigError(f"--claim_timeout must be positive, got {args.claim_timeout}")
    tracking_uri = args.tracking_uri or default_tracking_uri()
    check_reachable(tracking_uri)
    out = Path(args.out) if args.out else REPO_ROOT / "sweeps" / "results" / sweep.name
    tracker = SweepTracker(tracking_uri, sweep)
    out.mkdir(parents=True, exist_ok=True)
    claims = None
    if args.report_only:
        tracker.load()
        tracker.open_parent(create=False)
    else:
        claims = Claims(out, f"sweep {sweep.name}", args.claim_timeout)
        claims.clean_leftovers()
        with FileLock(out / ".parent.lock"):  # drivers started together continue one parent
            tracker.load()
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
                ran += execute(search + finals, tracker, args, out, claims)
            for method in stage:
                choices[method] = choice = choose(sweep, method, chosen, tracker.runs)
                if choice.config is not None:
                    chosen[method] = choice.config
                    tracker.record_choice(method, choice.config)
            finals = [(cell, "final") for m in stage if m in chosen
                      for cell in sweep.cells(m, chosen[m], sweep.final_seeds)]
        if not args.report_only:
            ran += execute(finals, tracker, args, out, claims)
        report = write_report(sweep, choices, tracker, out)
    except BaseException as error:
        if not args.report_only:  # a report leaves the parent's status as the sweep left it
            tracker.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if claims is not None:
            claims.close()
    if not args.report_only:
        tracker.finish("FINISHED")
    print(report["text"])
    print(f"report: {out}", flush=True)
    print(tracker.parent.where_to_look(f"sweep {sweep.name}"), flush=True)
    return {"ran": ran, "parent_run_id": tracker.parent.run_id, "chosen": chosen, "report": report}
