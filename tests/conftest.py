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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback, with its own store and artifact folder."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
               "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"]
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            break
        except OSError:
            if process.poll() is not None:
                raise RuntimeError((folder / "server.log").read_text())
            time.sleep(0.5)
    else:
        process.kill()
        raise RuntimeError("mlflow server did not start in 120 s: " + (folder / "server.log").read_text()[-2000:])
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()
