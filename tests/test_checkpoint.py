"""Checkpoints: a killed run resumes into the same MLflow run and ends with the uninterrupted run's results."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import main
from continual.run import run as run_experiment
from tests.conftest import REPO_ROOT
from continual.args import parse_args

# Plasticity methods with state of their own (utilities, host-side ages, a random schedule, θ₀) and the
# covariates' neuron ages must resume exactly too.
ARGS = ["--dataset", "seq-digits", "--model", "derpp", "--buffer_size", "60", "--lr", "0.05",
        "--plasticity", "cbp,redo,l2init", "--cbp_maturity", "20", "--redo_prob", "0.05", "--l2init_lambda", "1e-4",
        "--covariates", "--n_epochs", "25", "--seed", "3", "--non_verbose"]


@pytest.mark.slow
def test_a_run_killed_during_task_3_resumes_to_the_uninterrupted_result(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    checkpoint_dir = tmp_path / "checkpoints"
    command = [sys.executable, "main.py", *ARGS, "--tracking_uri", tracking_uri, "--savecheck",
               "--checkpoint_dir", str(checkpoint_dir)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    run_id, checkpoint = None, None
    for line in process.stdout:
        if line.startswith("MLflow run "):
            run_id = line.split()[2]
        if line.startswith("checkpoint after task 2:"):
            checkpoint = Path(line.split(": ", 1)[1].strip())
            process.send_signal(signal.SIGKILL)  # a real kill, while task 3 trains
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert checkpoint == checkpoint_dir / f"{run_id}.pt"
    assert torch.load(checkpoint, weights_only=True)["next_task"] == 2

    resumed = run_experiment(parse_args([*ARGS, "--resume", str(checkpoint), "--savecheck", "--tracking_uri",
                                         tracking_uri]))
    uninterrupted = run_experiment(parse_args([*ARGS, "--tracking_uri", f"sqlite:///{tmp_path / 'other.db'}"]))
    for setting in ("class_il", "task_il"):
        np.testing.assert_array_equal(resumed.matrices[setting], uninterrupted.matrices[setting])
    assert resumed.epoch_losses == uninterrupted.epoch_losses
    np.testing.assert_equal(resumed.history, uninterrupted.history)  # resets, covariates, terminal accuracies
    assert sum(resumed.history["plasticity/resets"]) > 0

    # The resumed run continued the killed run's MLflow run: one run, all five tasks, finished.
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("continual-learning").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "acc_class_il")] == [1, 2, 3, 4, 5]
    # task 3's points logged before the kill are not logged a second time by the resumed process
    for key in runs[0].data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), key
    assert torch.load(checkpoint, weights_only=True)["next_task"] == 5


def make_checkpoint(tmp_path) -> Path:
    run_experiment(parse_args([*ARGS[:-5], "--n_epochs", "1", "--seed", "3", "--non_verbose", "--savecheck",
                         "--checkpoint_dir", str(tmp_path), "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}"]))
    (path,) = tmp_path.glob("*.pt")
    return path


@pytest.mark.slow  # whole runs
def test_resuming_with_another_configuration_is_refused(tmp_path, capsys):
    path = make_checkpoint(tmp_path)
    code = main.main([*ARGS[:-5], "--n_epochs", "1", "--seed", "3", "--resume", str(path), "--lr", "0.1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "belongs to another configuration (--lr 0.05 in the checkpoint, 0.1 now)" in err


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_checkpoint_is_refused_and_left_in_place(tmp_path, capsys, damage):
    path = make_checkpoint(tmp_path)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2] if damage == "truncate" else b"not a checkpoint" * 100)
    code = main.main([*ARGS[:-5], "--n_epochs", "1", "--seed", "3", "--resume", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "is corrupt or not a checkpoint of this framework" in err
    assert path.exists()


def test_a_missing_checkpoint_names_the_path(tmp_path, capsys):
    code = main.main(["--model", "sgd", "--lr", "0.1", "--resume", str(tmp_path / "nope.pt")])
    assert code == 2 and "nope.pt: no such checkpoint file" in capsys.readouterr().err
