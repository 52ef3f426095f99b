"""Shared fixtures: every test logs into its own temporary MLflow store, never the repository's."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Small networks train fastest single-threaded, and tests may run beside other work.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The session's own cache folder (component catalogue, empty MLflow store), inherited by the processes
# tests start: what a user's cache holds never changes a test, and each session builds it once.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="test-cache-")


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


# -- helpers for more than one test module (import them from tests.conftest) ----------------------------
def dataset_args(data_path, **overrides):
    """The arguments a run passes to a dataset, reading files under data_path."""
    import argparse

    args = dict(device="cpu", n_tasks=None, data_path=str(data_path), download=False, class_order=None,
                permute_classes=False, label_noise=0.0, seed=0)
    return argparse.Namespace(**{**args, **overrides})


def build_dataset(name: str, data_path, **overrides):
    """A registered dataset built with the defaults a run would pass, reading files under data_path."""
    from datasets import DATASETS

    return DATASETS.get(name)(dataset_args(data_path, **overrides))


def shift_matches(out, images, padding: int):
    """[N, shifts] whether each output equals its input translated by that shift (zeros filling)."""
    import torch

    height, width = images.shape[2:]
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    shifts = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]
    return torch.stack([(out == padded[:, :, dy:dy + height, dx:dx + width]).flatten(1).all(1) for dy, dx in shifts], 1)


def build_model(*flags: str, model: str = "sgd"):
    """A continual model on its dataset from command-line flags (seed 0, CPU); returns (model, dataset)."""
    from backbones import BACKBONES
    from continual.args import parse_args
    from continual.run import set_seed
    from datasets import DATASETS
    from models import MODELS

    args = parse_args(["--model", model, "--lr", "0.05", "--seed", "0", "--device", "cpu", *flags])
    set_seed(0)
    dataset = DATASETS.get(args.dataset)(args)
    backbone = BACKBONES.get(args.backbone)(args, dataset.SHAPE, dataset.N_CLASSES)
    return MODELS.get(args.model)(backbone, dataset, args), dataset


def train_steps(model, dataset, steps: int, task: int = 0, batch_size: int = 32) -> None:
    """Optimizer steps on a task's training split, as the task loop takes them (observe, then the step)."""
    import torch

    split = dataset.train_split(task)
    for step in range(steps):
        rows = torch.arange(step * batch_size, (step + 1) * batch_size) % len(split)
        raw = split.images[rows]
        loss = model.lifecycle.observe(dataset.test_transform(raw), split.labels[rows], raw, split.indices[rows], task)
        model.lifecycle.step(loss)


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(os.environ["XDG_CACHE_HOME"], ignore_errors=True)
