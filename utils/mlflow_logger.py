"""Everything a run records goes to MLflow through RunLogger, in the driver process only; a sweep's
workers record into a RecordingLogger instead, and the driver replays the record into a run."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from utils.errors import ConfigError, deferred_termination

REPO_ROOT = Path(__file__).resolve().parents[1]
# Fail fast on a dead server instead of MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

import mlflow  # noqa: E402  (after the environment above is set)
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from utils.mlflow_store import (  # noqa: E402
    PROCESS_TAG,
    close_runs_of_ended_processes,
    process_identity,
    store_lock,
)

# MLflow 3 opens an experiment in its model-training view (not the GenAI one) when it carries this tag.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def default_tracking_uri() -> str:
    """The store a command without --tracking_uri logs to: MLflow's convention, the MLFLOW_TRACKING_URI
    environment variable, when it is set; else `sqlite:///<repo>/mlflow.db`, the store `mlflow ui` opens when
    started at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def run_exists(tracking_uri: str, run_id: str) -> bool:
    """Whether the store holds the run (a checkpoint's run may live in another store, or have been deleted)."""
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient(tracking_uri).get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def check_reachable(tracking_uri: str) -> None:
    """One sentence and no run when the tracking store cannot be reached."""
    if tracking_uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=10) as response:
                response.read()
        except (urllib.error.URLError, OSError) as error:
            raise ConfigError(
                f"the MLflow tracking server at {tracking_uri} is unreachable ({getattr(error, 'reason', error)}); "
                f"start it (mlflow server --host ...) or pass another --tracking_uri"
            ) from None
    elif tracking_uri.startswith("sqlite:///"):
        if any(c in tracking_uri for c in "?%#"):  # SQLAlchemy reads them as a query or an escape: another file
            raise ConfigError(f"--tracking_uri {tracking_uri} holds ?, % or #, which SQLite URIs read as a query or an "
                              f"escape, so the store would be another file; use a path without them")
        folder = Path(tracking_uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise ConfigError(f"the folder {folder} of --tracking_uri {tracking_uri} does not exist; create it or "
                              f"pass another --tracking_uri")


def _artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """Artifacts of a local SQLite store go to `mlruns/` beside the database, whatever the working directory."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a server decides where artifacts go
    database = Path(tracking_uri[len("sqlite:///"):]).resolve()
    # Letters, digits and _ . - only, and no leading dot: a name such as ".." stays a folder inside mlruns/.
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment_name).lstrip(".") or "_"
    return (database.parent / "mlruns" / slug).as_uri()


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_tags(device: str) -> dict[str, str]:
    """Where and with what a run ran: git commit, device, and library versions (read from the installed
    packages' metadata: importing torchvision and timm only for their versions would cost seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import torch

    def installed(distribution: str) -> str | None:
        try:
            return version(distribution)
        except PackageNotFoundError:
            return None

    commit = git_commit()
    tags = {
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "device": str(device) if device == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "python_version": sys.version.split()[0],
        "torch_version": torch.__version__,
        "numpy_version": numpy.__version__,
        "mlflow_version": mlflow.__version__,
    }
    for distribution in ("torchvision", "timm"):
        if installed(distribution):
            tags[f"{distribution}_version"] = installed(distribution)
    return tags


def param_text(value) -> str:
    """A parameter as text: lists and tuples as '0.7,0.9', not as a Python repr."""
    if isinstance(value, (list, tuple)):
        return ",".join(param_text(v) for v in value)
    return str(value)


def _point(metric: Metric) -> tuple:
    """A metric point without its time; NaN as text, so that a NaN point equals itself."""
    return metric.key, metric.step, "nan" if metric.value != metric.value else metric.value


class UninterruptedClient:
    """An MlflowClient whose every call finishes before a SIGTERM takes effect (utils.errors.deferred_termination)."""

    def __init__(self, client: MlflowClient):
        self._client = client

    def __getattr__(self, name: str):
        method = getattr(self._client, name)

        def call(*args, **kwargs):
            with deferred_termination():
                return method(*args, **kwargs)
        return call


class RunLogger:
    """One MLflow run: created new, or continued after a resume (same run id)."""

    LIVE = True  # watched while it runs: figures are redrawn as tasks finish
    _logged: frozenset = frozenset()  # (key, step, value) points the run held when this process continued it

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str | None = None,
                 run_id: str | None = None, tags: dict[str, str] | None = None, keep_status: bool = False,
                 start_time: float | None = None):
        """`start_time` (seconds since the epoch) dates a new run whose work began before it was created."""
        check_reachable(tracking_uri)
        self.tracking_uri = tracking_uri
        with store_lock(tracking_uri):
            self.client = UninterruptedClient(MlflowClient(tracking_uri))  # creates and migrates a new store
            if run_id is not None:
                self.run_id = run_id
                if not keep_status:
                    self.client.update_run(run_id, status="RUNNING")
                    self.client.set_tag(run_id, PROCESS_TAG, process_identity())
                    self._logged = self._logged_points()
                return
            experiment = self.client.get_experiment_by_name(experiment_name)
            if experiment is None:
                experiment_id = self.client.create_experiment(
                    experiment_name, artifact_location=_artifact_location(tracking_uri, experiment_name),
                    tags={EXPERIMENT_KIND: MODEL_TRAINING})
            else:
                experiment_id = experiment.experiment_id
                if experiment.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
                    self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
            for closed in close_runs_of_ended_processes(self.client, experiment_id):
                print(f"MLflow run {closed} was left RUNNING by a process that has ended; marked KILLED", flush=True)
            source = {"mlflow.source.name": Path(sys.argv[0]).name or "python", "mlflow.source.type": "LOCAL",
                      PROCESS_TAG: process_identity()}
            self.run_id = self.client.create_run(
                experiment_id, run_name=run_name, tags={**source, **(tags or {})},
                start_time=None if start_time is None else int(start_time * 1000)).info.run_id

    def log_params(self, params: dict) -> None:
        items = [Param(k, param_text(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's limit of params per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def set_tags(self, tags: dict) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training") -> None:
        """The data a run trained on, as an MLflow dataset input (the UI's Dataset column)."""
        dataset = Dataset(name=name, digest=digest, source_type="local", source=source)
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._write_metrics([Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_series(self, name: str, values: list[float], first_step: int) -> None:
        """One metric at consecutive steps, in as few writes as the store allows (a write costs ~30 ms)."""
        now = int(time.time() * 1000)
        self._write_metrics([Metric(name, float(v), now, first_step + i) for i, v in enumerate(values)])

    def _logged_points(self) -> frozenset:
        """The points a continued run already holds. A process killed after logging part of a task (or all of it,
        before its checkpoint) logged points that the resumed process computes again, bit for bit: written
        once, not twice. A point computed again with another value is written, so both attempts stay visible."""
        run = self.client.get_run(self.run_id)
        return frozenset(_point(m) for key in run.data.metrics for m in self.client.get_metric_history(self.run_id, key))

    def _write_metrics(self, metrics: list[Metric]) -> None:
        if self._logged:
            metrics = [m for m in metrics if _point(m) not in self._logged]
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_array(self, array, artifact_file: str) -> None:
        """An array as a .npy artifact (read back with np.load(..., allow_pickle=False))."""
        import numpy as np

        folder, name = os.path.split(artifact_file)
        with tempfile.TemporaryDirectory() as temporary:
            path = os.path.join(temporary, name)
            np.save(path, array)
            self.client.log_artifact(self.run_id, path, folder or None)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def where_to_look(self, what: str = "results") -> str:
        """The run, the direct link to its page and the command that serves the store (utils/mlflow_ui.py)."""
        from utils.mlflow_ui import where_to_look

        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        return where_to_look(self.tracking_uri, experiment_id, self.run_id, what)

    def state_dict(self) -> dict:
        return {}  # the run id is stored in the checkpoint itself

    def load_state_dict(self, state: dict) -> None:
        pass

    def replay(self, record: dict) -> None:
        """Write what a RecordingLogger recorded (in a worker) into this run, in a few batched writes."""
        self.log_params(record["params"])
        self.set_tags(record["tags"])
        self._write_metrics([Metric(key, value, timestamp, step) for key, value, timestamp, step in record["metrics"]])
        for name, digest, source, context in record.get("datasets", []):
            self.log_dataset(name, digest, source, context)
        if record["artifacts"]:
            with tempfile.TemporaryDirectory() as temporary:
                root = Path(temporary).resolve()
                for name, content in record["artifacts"].items():
                    path = (root / name).resolve()
                    if not path.is_relative_to(root) or path == root:
                        raise ConfigError(f"a recorded artifact is named {name!r}, which points outside its run; the "
                                          f"record (a sweep cell's checkpoint) was not written by this tool: delete it")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(content)
                self.client.log_artifacts(self.run_id, temporary)


class RecordingLogger:
    """RunLogger's interface, kept in memory: a worker records a run and the driver replays it into MLflow.

    Artifacts are kept by name, the last version winning, as MLflow overwrites them; the record is
    saved in the run's checkpoints, so a resumed run's record holds everything logged before the kill,
    and `started` (seconds since the epoch) says when the run first began, before any kill.
    """

    LIVE = False  # nobody sees a figure before the run ends: draw them once, after the last task

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.record = {"params": {}, "tags": {}, "metrics": [], "artifacts": {}, "started": time.time()}

    def log_params(self, params: dict) -> None:
        self.record["params"].update({k: param_text(v) for k, v in params.items()})

    def set_tags(self, tags: dict) -> None:
        self.record["tags"].update({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.record["metrics"].extend((k, float(v), now, step) for k, v in metrics.items())

    def log_series(self, name: str, values: list[float], first_step: int) -> None:
        now = int(time.time() * 1000)
        self.record["metrics"].extend((name, float(v), now, first_step + i) for i, v in enumerate(values))

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training") -> None:
        self.record.setdefault("datasets", []).append((name, digest, source, context))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.record["artifacts"][artifact_file] = text.encode()

    def log_figure(self, figure, artifact_file: str) -> None:
        buffer = io.BytesIO()
        figure.savefig(buffer, format=Path(artifact_file).suffix[1:] or "png")
        self.record["artifacts"][artifact_file] = buffer.getvalue()

    def log_array(self, array, artifact_file: str) -> None:
        import numpy as np

        buffer = io.BytesIO()
        np.save(buffer, array)
        self.record["artifacts"][artifact_file] = buffer.getvalue()

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        name = Path(local_path).name
        self.record["artifacts"][f"{artifact_path}/{name}" if artifact_path else name] = Path(local_path).read_bytes()

    def finish(self, status: str = "FINISHED") -> None:
        pass  # the driver sets the child run's status from the worker's outcome

    def state_dict(self) -> dict:
        return self.record

    def load_state_dict(self, state: dict) -> None:
        self.record = state
