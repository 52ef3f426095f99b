"""A sweep's child runs span their cells: created with the time the cell started and ended with the time it ended,
also for a cell that was killed and continued from its checkpoint."""
from __future__ import annotations

import time

import pytest

import continual.run
import continual.sweep
from continual.sweep import run_sweep
from continual.sweep_runs import SweepTracker, run_cell
from continual.sweep_spec import load_sweep
from tests.test_sweep import children, parents, sweep_args, write

pytestmark = pytest.mark.slow  # real sweeps of real cells

# Forty epochs per task make a cell take about two seconds on seq-digits (eight: about one).
SPEC = {"name": "timed", "base": {"dataset": "seq-digits", "model": "sgd", "n_epochs": 40, "batch_size": 32,
                                  "mlp_hidden": 32},
        "methods": {"vanilla": {"grid": {"lr": [0.05, 0.1]}}}, "selection": {"metric": "acc_class_il"},
        "search_seeds": [0], "final_seeds": [1]}


def test_each_child_run_starts_and_ends_when_its_cell_did(tmp_path, monkeypatch):
    results = {}

    def recorded(*job):
        results[job[0]] = result = run_cell(*job)
        return result

    monkeypatch.setattr(continual.sweep, "run_cell", recorded)  # the local launcher runs cells in this process
    run_sweep(sweep_args(write(tmp_path / "timed.yaml", SPEC), tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = sorted(children(uri, "timed"), key=lambda run: run.info.start_time)
    [parent] = parents(uri, "timed")
    assert len(runs) == len(results) == 3
    for run in runs:
        result = results[run.data.tags["sweep_cell"]]
        assert (run.info.start_time, run.info.end_time) == (int(result["started"] * 1000), int(result["ended"] * 1000))
        seconds = (run.info.end_time - run.info.start_time) / 1000
        assert seconds > 1.0
        assert seconds == pytest.approx(float(run.data.tags["sweep_seconds"]), abs=0.06)
        # every metric the cell logged was logged between its start and its end
        logged = [timestamp for _, _, timestamp, _ in result["record"]["metrics"]]
        assert run.info.start_time <= min(logged) <= max(logged) <= run.info.end_time
    assert runs[0].info.start_time >= parent.info.start_time
    # One cell after the other on the local launcher: each child begins after the one before it ended.
    assert all(a.info.end_time <= b.info.start_time for a, b in zip(runs, runs[1:]))


def test_a_resumed_cell_is_dated_from_its_first_start(tmp_path, monkeypatch):
    sweep = load_sweep(write(tmp_path / "resumed.yaml", {**SPEC, "name": "resumed"}))
    cell = sweep.search_cells("vanilla", {})[1]
    checkpoints = tmp_path / "checkpoints"
    save_checkpoint = continual.run.save_checkpoint

    def save_then_stop(path, payload):
        save_checkpoint(path, payload)
        raise KeyboardInterrupt  # as if killed right after the checkpoint of the first task

    monkeypatch.setattr(continual.run, "save_checkpoint", save_then_stop)
    launched = time.time()
    with pytest.raises(KeyboardInterrupt):
        run_cell(cell.key, cell.argv(), str(checkpoints))
    monkeypatch.setattr(continual.run, "save_checkpoint", save_checkpoint)
    assert (checkpoints / f"{cell.key}.pt").exists()
    resumed_at = time.time()
    result = run_cell(cell.key, cell.argv(), str(checkpoints))
    assert result["outcome"] == "finished"
    assert launched < result["started"] < resumed_at < result["ended"]
    assert 0 < result["seconds"] <= result["ended"] - resumed_at  # the attempt that finished it
    tracker = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", sweep)
    tracker.open_parent()
    run = tracker.log_cell(cell, "search", result)
    assert (run.info.start_time, run.info.end_time) == (int(result["started"] * 1000), int(result["ended"] * 1000))
    assert run.info.status == "FINISHED" and run.data.tags["sweep_seconds"] == f"{result['seconds']:.1f}"
