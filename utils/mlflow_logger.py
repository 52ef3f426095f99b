"""Everything a run records goes to MLflow through this one class; only the driver process uses it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from utils.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
# Fail fast on a dead server instead of MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

import mlflow  # noqa: E402  (after the environment above is set)
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402


def default_tracking_uri() -> str:
    """`sqlite:///<repo>/mlflow.db`, the store `mlflow ui` opens when started at the repository root."""
    return f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


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
        folder = Path(tracking_uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise ConfigError(f"the folder {folder} of --tracking_uri {tracking_uri} does not exist; create it or "
                              f"pass another --tracking_uri")


def _artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """Artifacts of a local SQLite store go to `mlruns/` beside the database, whatever the working directory."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a server decides where artifacts go
    database = Path(tracking_uri[len("sqlite:///"):]).resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment_name)
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
    """Where and with what a run ran: git commit, device, and library versions."""
    import numpy
    import torch
    import torchvision

    commit = git_commit()
    tags = {
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "device": str(device) if device == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "python_version": sys.version.split()[0],
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "numpy_version": numpy.__version__,
        "mlflow_version": mlflow.__version__,
    }
    try:
        import timm
        tags["timm_version"] = timm.__version__
    except ImportError:
        pass
    return tags


class RunLogger:
    """One MLflow run: created new, or continued after a resume (same run id)."""

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str | None = None,
                 run_id: str | None = None):
        check_reachable(tracking_uri)
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            experiment_id = self.client.create_experiment(
                experiment_name, artifact_location=_artifact_location(tracking_uri, experiment_name))
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_params(self, params: dict) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def set_tags(self, tags: dict) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_series(self, name: str, values: list[float], first_step: int) -> None:
        """One metric at consecutive steps, in as few writes as the store allows (a write costs ~30 ms)."""
        now = int(time.time() * 1000)
        metrics = [Metric(name, float(v), now, first_step + i) for i, v in enumerate(values)]
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
