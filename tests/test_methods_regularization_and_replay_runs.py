"""ER-ACE, A-GEM, GDumb, LwF, online EWC and SI end to end: a short run of each through main.py, and a run
killed after its task-2 checkpoint that resumes to the uninterrupted run's results (the models' own state
— Fisher and anchor, path integral and importance, classes seen, the GDumb sampler — travels in the
checkpoint). The figures are drawn by tests/test_main.py's runs; here they are skipped for speed."""
from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import continual.run
import continual.records
import main
from continual.args import parse_args
from continual.run import run as run_experiment
from utils.mlflow_logger import RecordingLogger

METHODS = {
    "er_ace": ["--buffer_size", "50"],
    "agem": ["--buffer_size", "50"],
    "gdumb": ["--buffer_size", "50", "--fitting_epochs", "8", "--maxlr", "0.2"],
    "lwf": [],
    "ewc_on": ["--e_lambda", "5"],
    "si": ["--si_c", "0.5", "--xi", "0.5"],
}
BASE = ["--dataset", "seq-digits", "--n_epochs", "1", "--lr", "0.05", "--seed", "0", "--device", "cpu", "--non_verbose"]


@pytest.fixture(scope="module")
def shared_tracking_uri(tmp_path_factory) -> str:
    """One MLflow store for the six runs: creating a store costs seconds, a run in it far less."""
    return f"sqlite:///{tmp_path_factory.mktemp('runs') / 'mlflow.db'}"


@pytest.fixture
def no_figures(monkeypatch):
    monkeypatch.setattr(continual.records, "log_figures", lambda *args, **kwargs: None)


@pytest.mark.parametrize("name", METHODS)
def test_a_short_run_through_main_completes_and_reports_accuracies(name, shared_tracking_uri, no_figures):
    run_name = f"{name}-e2e"
    code = main.main(["--model", name, *METHODS[name], *BASE, "--tracking_uri", shared_tracking_uri,
                      "--run_name", run_name])
    assert code == 0
    client = MlflowClient(shared_tracking_uri)
    experiment = client.get_experiment_by_name("continual-learning")
    (logged,) = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{run_name}'")
    assert logged.info.status == "FINISHED" and logged.data.params["model"] == name
    metrics = logged.data.metrics
    accuracies = [metrics[f"acc_{s}_per_task/task_{t}"] for s in ("class_il", "task_il") for t in range(1, 6)]
    accuracies += [metrics["acc_class_il"], metrics["acc_task_il"]]
    assert all(0 <= a <= 100 for a in accuracies)  # percentages
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "acc_class_il")] == [1, 2, 3, 4, 5]
    assert metrics["acc_task_il"] > 50  # two classes per task: above chance after one epoch (or one fit)


@pytest.mark.parametrize("name", METHODS)
def test_a_run_killed_after_task_2_resumes_to_the_uninterrupted_result(name, tmp_path, monkeypatch, no_figures):
    argv = ["--model", name, *METHODS[name], *BASE]
    uninterrupted = run_experiment(parse_args(argv), logger=RecordingLogger(run_id="whole"))
    real_save = continual.run.save_checkpoint

    def save_then_stop(path, payload):
        real_save(path, payload)
        if payload["next_task"] == 2:
            raise KeyboardInterrupt  # as if killed right after the checkpoint of task 2

    monkeypatch.setattr(continual.run, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(parse_args([*argv, "--savecheck", "--checkpoint_dir", str(tmp_path)]),
                       logger=RecordingLogger(run_id="cut"))
    monkeypatch.setattr(continual.run, "save_checkpoint", real_save)
    (checkpoint,) = tmp_path.glob("*.pt")
    resumed = run_experiment(parse_args([*argv, "--resume", str(checkpoint)]), logger=RecordingLogger(run_id="cut"))
    for setting in ("class_il", "task_il"):
        np.testing.assert_array_equal(resumed.matrices[setting], uninterrupted.matrices[setting])
    np.testing.assert_array_equal(resumed.epoch_losses, uninterrupted.epoch_losses)
