"""The SQLite store's own care: the lock and the empty-store template that make creating a store safe and
fast, and the identity of the process writing a run, so that a run left RUNNING by a process that has
ended is found and closed."""
from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from utils.cache import cache_dir, trusted


# The process writing a run, host:pid:start, so that a later process can tell the run's writer is gone.
PROCESS_TAG = "process"


def _process_start(pid: int) -> str | None:
    """When the process started (clock ticks since boot, from /proc; None where there is no /proc or no such
    process): a pid reused by another process has another start."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]  # field 22 of the whole line: starttime
    except (OSError, IndexError):
        return None


def process_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid()) or ''}"


def process_gone(identity: str) -> bool:
    """Whether the process named by `identity` ran on this machine and has ended (False when it cannot tell)."""
    try:
        host, pid, start = identity.rsplit(":", 2)
        pid = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    if start:
        return _process_start(pid) != start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def close_runs_of_ended_processes(client, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this experiment whose writing process ran on this machine and is gone (a
    kill -9, a power cut): MLflow would show them running forever. Returns their ids."""
    closed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        identity = run.data.tags.get(PROCESS_TAG)
        if identity and identity != process_identity() and process_gone(identity):
            client.set_tag(run.info.run_id, "killed", "its process ended without closing the run; marked KILLED "
                                                      "by a later run on the same machine")
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


@contextlib.contextmanager
def store_lock(tracking_uri: str):
    """Held while a run opens: MLflow creates and migrates a new SQLite store on first use, and two processes
    doing it at once fail (duplicate column, table already exists); so does creating one experiment twice.
    A file lock beside the database serialises them; a server store needs none."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    database = Path(tracking_uri[len("sqlite:///"):])
    with FileLock(database.with_suffix(".lock")):
        if not database.exists() or database.stat().st_size == 0:
            _seed_new_store(database)
        yield


def _seed_new_store(database: Path) -> None:
    """Start a new SQLite store as a copy of an empty store of this MLflow version.

    MLflow builds a new store by running its schema migrations, which takes seconds (6–7 s on 2
    shared cores) every time; a copy takes milliseconds. The empty store is built once per MLflow
    version in the cache folder; its Default experiment is pointed at `mlruns/0` beside the new
    database, where MLflow itself would have put it. Without a writable cache MLflow builds the store.
    A template that is not this user's own, is writable by others, or holds anything but MLflow's
    Default experiment (an experiment planted with another artifact location, say) is built again."""
    import shutil
    import sqlite3

    template = cache_dir() / f"mlflow-{mlflow.__version__}-empty-store.db"
    try:
        if template.exists() and not _trusted_template(template):
            template.unlink()
        if not template.exists():
            template.parent.mkdir(parents=True, exist_ok=True)
            # a name of its own: MLflow keeps a store's engine by URI, and a rebuilt file under an old name is
            # taken for migrated already
            building = template.with_suffix(f".{os.getpid()}.{time.monotonic_ns()}.tmp")
            building.unlink(missing_ok=True)
            MlflowClient(f"sqlite:///{building}").search_experiments()  # MLflow's own migrations
            os.chmod(building, 0o600)
            os.replace(building, template)
        copy = database.with_name(f".{database.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, copy)
        with contextlib.closing(sqlite3.connect(copy)) as connection, connection:
            now = int(time.time() * 1000)
            connection.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                               "WHERE experiment_id = 0", (str(database.resolve().parent / "mlruns" / "0"), now, now))
        os.replace(copy, database)
    except (OSError, sqlite3.Error):  # no cache: MLflow creates the store on first use, as it always can
        pass


def _trusted_template(path: Path) -> bool:
    """Whether an empty-store template is one this user built: owned by them, writable by nobody else, and holding
    only MLflow's Default experiment and no run."""
    import sqlite3

    if not trusted(path):
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
            experiments = connection.execute("SELECT experiment_id FROM experiments").fetchall()
            runs = connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.Error:
        return False
    return experiments == [(0,)] and runs == 0
