"""A sweep's runs: the worker that trains one cell, and the driver's MLflow records of parent and cells.

Workers never touch MLflow: a cell runs main.py with a RecordingLogger, checkpoints after every task
(the record inside), and returns the record; the driver alone writes it into a child run.
"""
from __future__ import annotations

import contextlib
import io
import sys
import time
import traceback
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from continual.sweep_spec import Cell, Sweep
from utils.errors import ConfigError, TrainingDiverged
from utils.mlflow_logger import RecordingLogger, RunLogger, UninterruptedClient
from utils.mlflow_store import PROCESS_TAG, process_gone, process_identity, store_lock

PARENT_TAG = "mlflow.parentRunId"


def run_cell(key: str, argv: list[str], checkpoint_dir: str, threads: int | None = None) -> dict:
    """Worker: train one cell, resuming from its checkpoint when a killed sweep left one. Returns its record, its
    outcome, when it `started` (a resumed cell: when its first attempt did, as its checkpointed record says) and
    `ended` (seconds since the epoch), and the `seconds` this attempt took."""
    from continual.args import computational_config, parse_args
    from continual.run import run
    from backbones import FLAGS_ADDED
    from utils.checkpoint import check_same_config, load_checkpoint

    checkpoint = Path(checkpoint_dir) / f"{key}.pt"
    argv = [*argv, "--non_verbose", "--savecheck", "--checkpoint_dir", checkpoint_dir,
            *(["--num_threads", str(threads)] if threads else [])]
    logger = RecordingLogger(run_id=key)
    start = logger.record["started"]
    outcome, error = "finished", ""
    try:
        args = parse_args(argv)
        if checkpoint.exists():
            try:
                check_same_config(checkpoint, load_checkpoint(checkpoint)["config"], computational_config(args),
                                  FLAGS_ADDED)
                args.resume = str(checkpoint)
            except ConfigError as problem:  # corrupt, or written for another device: kept aside, the cell restarts
                checkpoint.rename(checkpoint.with_name(checkpoint.name + ".refused"))
                print(f"cell {key}: not resuming ({problem}); starting again", file=sys.stderr, flush=True)
        with contextlib.redirect_stdout(io.StringIO()):  # main.py's tables and checkpoint lines
            run(args, logger)
    except TrainingDiverged as problem:
        outcome, error = "diverged", str(problem)
    except ConfigError as problem:
        outcome, error = "error", str(problem)
    except Exception as problem:  # a bug or a lost device: reported by the driver, the cell stays unfinished
        outcome, error = "error", f"{type(problem).__name__}: {problem}\n{traceback.format_exc()}"
    ended = time.time()
    return {"key": key, "outcome": outcome, "error": error, "record": logger.record,
            "started": logger.record.get("started", start), "ended": ended, "seconds": ended - start}


def done(run: Run) -> bool:
    """Finished, or diverged (a result of its configuration, not a reason to run it again)."""
    return run.info.status == "FINISHED" or (run.info.status == "FAILED"
                                             and run.data.tags.get("sweep_outcome") == "diverged")


class SweepTracker:
    """The sweep's MLflow experiment: one parent run per version of the sweep file, one child per cell."""

    def __init__(self, tracking_uri: str, sweep: Sweep):
        self.tracking_uri = tracking_uri
        self.sweep = sweep
        self.parent: RunLogger | None = None
        with store_lock(tracking_uri):
            self.client = UninterruptedClient(MlflowClient(tracking_uri))  # creates and migrates a new store
        self.runs: dict[str, Run] = {}

    def _search(self, filter_string: str) -> list[Run]:
        experiment = self.client.get_experiment_by_name(self.sweep.name)
        if experiment is None:
            return []
        runs, token = [], None
        while True:
            page = self.client.search_runs([experiment.experiment_id], filter_string, max_results=5000,
                                           order_by=["attributes.start_time DESC"], page_token=token)
            runs += page
            token = page.token
            if not token:
                return runs

    def load(self) -> dict[str, Run]:
        """The finished cells of this sweep by key (of any version of the file), the newest run of each."""
        self.runs = {}
        for run in self._search(f"tags.sweep_name = '{self.sweep.name}' and tags.sweep_role = 'cell'"):
            if done(run):
                self.runs.setdefault(run.data.tags["sweep_cell"], run)
        return self.runs

    def finished(self, key: str) -> bool:
        """Whether the cell has a finished run in the store (logged by this driver or by another of the sweep)."""
        if key in self.runs:
            return True
        for run in self._search(f"tags.sweep_name = '{self.sweep.name}' and tags.sweep_cell = '{key}'"):
            if done(run):
                self.runs[key] = run
                return True
        return False

    def parents(self) -> list[Run]:
        return self._search(f"tags.sweep_name = '{self.sweep.name}' and tags.sweep_role = 'parent'")

    def open_parent(self, create: bool = True) -> str:
        """Continue the parent of this version of the file, or start a new one; returns a sentence on what it did."""
        parents = self.parents()
        fingerprint = self.sweep.fingerprint
        if not create:
            if not parents or parents[0].data.tags.get("sweep_fingerprint") != fingerprint:
                raise ConfigError(f"sweep {self.sweep.name} has not been run with this version of {self.sweep.path} in "
                                  f"{self.tracking_uri}; run it (without --report_only) first")
            self.parent = RunLogger(self.tracking_uri, self.sweep.name, run_id=parents[0].info.run_id,
                                    keep_status=True)
            return f"report of sweep {self.sweep.name} (parent run {self.parent.run_id})"
        if parents and parents[0].data.tags.get("sweep_fingerprint") == fingerprint:
            self.parent = RunLogger(self.tracking_uri, self.sweep.name, run_id=parents[0].info.run_id)
            message = f"continuing sweep {self.sweep.name} (parent run {self.parent.run_id})"
        else:
            self.parent = RunLogger(self.tracking_uri, self.sweep.name, run_name=self.sweep.name, tags={
                "sweep_role": "parent", "sweep_name": self.sweep.name, "sweep_fingerprint": fingerprint,
                "sweep_version": str(len(parents) + 1)})
            self.parent.log_text(self.sweep.text, "sweep.yaml")
            self.parent.log_params({"sweep_file": self.sweep.path.name, "selection_metric": self.sweep.metric,
                                    "selection_mode": self.sweep.mode, "search_seeds": self.sweep.search_seeds,
                                    "final_seeds": self.sweep.final_seeds, "methods": ",".join(self.sweep.methods)})
            if parents:
                previous = parents[0].info.run_id
                self.client.set_tag(previous, "superseded_by", self.parent.run_id)
                self.parent.set_tags({"supersedes": previous})
                message = (f"the sweep file changed since its last run (parent {previous}): finished cells that are "
                           f"still in it are reused, only new cells run (new parent run {self.parent.run_id})")
            else:
                message = f"new sweep {self.sweep.name} (parent run {self.parent.run_id})"
        self._close_stale()
        return message

    def _close_stale(self) -> None:
        """Children left RUNNING by a driver killed while writing them: marked KILLED, their cells run again. A
        child another live driver of the sweep is writing now is left alone."""
        for run in self._search(f"tags.sweep_name = '{self.sweep.name}' and tags.sweep_role = 'cell' "
                                f"and attributes.status = 'RUNNING'"):
            writer = run.data.tags.get(PROCESS_TAG)
            if writer is None or (writer != process_identity() and process_gone(writer)):
                self.client.set_terminated(run.info.run_id, status="KILLED")

    def adopt(self, run: Run) -> None:
        """A cell finished under an earlier version of the file belongs to the current parent now."""
        if self.parent is not None and run.data.tags.get(PARENT_TAG) != self.parent.run_id:
            self.client.set_tag(run.info.run_id, PARENT_TAG, self.parent.run_id)

    def log_cell(self, cell: Cell, phase: str, result: dict) -> Run:
        """Write a worker's record as a child run of the parent, dated from when the cell started to when it ended."""
        child = RunLogger(self.tracking_uri, self.sweep.name, run_name=cell.run_name, start_time=result["started"],
                          tags={PARENT_TAG: self.parent.run_id, "sweep_role": "cell", "sweep_name": self.sweep.name,
                                "sweep_cell": cell.key, "sweep_method": cell.method, "sweep_phase": phase,
                                "sweep_config": ", ".join(f"{k}={v}" for k, v in cell.config.items()) or "(base)"})
        record = result["record"]
        # the cell's checkpoint is deleted once the cell is logged: no tag points at it
        child.replay({**record, "tags": {k: v for k, v in record["tags"].items() if k != "checkpoint"}})
        child.set_tags({"sweep_outcome": result["outcome"], "sweep_seconds": f"{result['seconds']:.1f}"})
        self.client.set_terminated(child.run_id, status="FINISHED" if result["outcome"] == "finished" else "FAILED",
                                   end_time=int(result["ended"] * 1000))
        return self.client.get_run(child.run_id)

    def record_choice(self, method: str, config: dict) -> None:
        """The chosen configuration of a method, as a param of the parent (params cannot change afterwards)."""
        value = ", ".join(f"{k}={v}" for k, v in config.items()) or "(base)"
        key = f"chosen/{method}"
        logged = self.client.get_run(self.parent.run_id).data.params.get(key)
        if logged is None:
            self.parent.log_params({key: value})
        elif logged != value:  # a rerun cell changed the choice: keep both, visibly
            self.parent.set_tags({f"{key}/now": value})
            print(f"warning: method {method}'s chosen configuration changed from {logged} to {value}", flush=True)

    def finish(self, status: str) -> None:
        if self.parent is not None:
            try:
                self.parent.finish(status)
            except MlflowException:
                pass
