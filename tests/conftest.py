"""Shared fixtures: every test logs into its own temporary MLflow store, never the repository's."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Small networks train fastest single-threaded, and tests may run beside other work.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(command: list[str], cwd: Path, log_path: Path):
    """Start an MLflow web process on a free loopback port; returns (process, url) once /health answers."""
    port = free_port()
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "mlflow", *command, "--host", "127.0.0.1", "--port", str(port),
                                "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return process, url
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"mlflow {command[0]} did not start: " + log_path.read_text()[-2000:])


def stop(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback, with its own store and proxied artifact folder."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    process, url = start_mlflow(["server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                                 "--artifacts-destination", str(folder / "artifacts")], folder, folder / "server.log")
    yield url
    stop(process)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster shared by every test that needs one; yields its address."""
    ray = pytest.importorskip("ray")
    from utils.launchers import start_ray

    start_ray(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
