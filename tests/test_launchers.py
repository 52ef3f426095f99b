"""Every launcher trains the same models into the same store as the in-process default."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

import train_splits
from memorization.driver import run_plan
from utils.launchers import run_jobs
from memorization.store import SubsetStore

pytestmark = pytest.mark.slow  # real processes, clusters or servers: run by CI, not by `-m "not slow"`

ARGS = ["--dataset", "seq-digits", "--n_models", "4", "--n_epochs", "2", "--lr", "0.1", "--batch_size", "64",
        "--mlp_hidden", "32", "--ensemble", "2", "--non_verbose"]


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("local")
    run_plan(train_splits.parse_args([*ARGS, "--out", str(folder / "store"),
                                              "--tracking_uri", f"sqlite:///{folder / 'mlflow.db'}"]))
    return folder / "store"


def same_models(store_a, store_b) -> None:
    for model_id in range(4):
        a = np.load(SubsetStore(store_a).model_path(model_id))
        b = np.load(SubsetStore(store_b).model_path(model_id))
        for key in ("prob_train", "correct_train", "prob_test", "correct_test"):
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("launcher", [["--launcher", "pool", "--workers", "2"],
                                      ["--launcher", "slurm", "--submitit_cluster", "local"]])
def test_pool_and_slurm_launchers_store_the_same_models(tmp_path, local_store, launcher):
    result = run_plan(train_splits.parse_args([*ARGS, *launcher, "--out", str(tmp_path / "store"),
                                                       "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]))
    assert result["trained"] == 4
    same_models(local_store, tmp_path / "store")


def test_ray_launcher_stores_the_same_models(tmp_path, local_store, ray_cluster):
    result = run_plan(train_splits.parse_args([*ARGS, "--launcher", "ray", "--out", str(tmp_path / "store"),
                                                       "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]))
    assert result["trained"] == 4
    same_models(local_store, tmp_path / "store")


def test_chunks_partition_the_plan(tmp_path):
    """SLURM arrays run `--chunk I/N`: together the chunks train every group (of 2 models) exactly once."""
    stored = []
    for index in range(2):
        run_plan(train_splits.parse_args([*ARGS, "--chunk", f"{index}/2", "--out", str(tmp_path / "store"),
                                                  "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]))
        stored.append(SubsetStore(tmp_path / "store").stored_models())
    assert stored == [{0, 1}, {0, 1, 2, 3}]


@pytest.mark.parametrize("launcher", ["local", "pool"])
def test_no_job_starts_after_the_stop_condition(launcher):
    """A sweep stops starting cells after a failed one; the jobs already running still report."""
    args = argparse.Namespace(launcher=launcher, workers=1, max_parallel=None)
    results = list(run_jobs(abs, [(-1,), (-2,), (-3,), (-4,)], args, Path("."), stop=lambda r: r == 2))
    assert results == [1, 2]


def test_slurm_without_slurm_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    code = train_splits.main([*ARGS, "--launcher", "slurm", "--out", str(tmp_path / "store"),
                              "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --launcher slurm needs SLURM, and sbatch is not on this machine's PATH; run it on a SLURM login "
        "node, or add --submitit_cluster local for a local debug run")
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()


def test_ray_workers_run_at_normal_priority(ray_cluster):
    import os

    import ray

    @ray.remote
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == os.nice(0)
