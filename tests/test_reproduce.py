"""A run is reproducible from its record: its command line, its resolved configuration in the form --config reads,
its console output; and a stopped run says how to continue it."""
from __future__ import annotations

import shlex

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

import continual.training
import main
from tests.test_run_failures import ARGV

ARGS = [a for a in ARGV if a != "--seed" and a != "0"]  # no seed: the run draws one, and its record keeps it


def the_run(uri: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("continual-learning").experiment_id])
    return client, run


def accuracies(client, run) -> dict:
    return {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
            for key in run.data.metrics if key.startswith("acc_")}


def test_rerunning_a_runs_logged_configuration_gives_the_same_accuracy_matrix(tmp_path):
    first, again = f"sqlite:///{tmp_path / 'first.db'}", f"sqlite:///{tmp_path / 'again.db'}"
    assert main.main([*ARGS, "--tracking_uri", first]) == 0
    client, run = the_run(first)
    config = yaml.safe_load(open(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))))
    assert config["n_tasks"] == 5 and run.data.params["n_tasks"] == "5"  # resolved, not None
    assert isinstance(config["seed"], int) and str(config["seed"]) == run.data.params["seed"]
    assert "tracking_uri" not in config and "resume" not in config
    assert run.data.tags["command_line"].endswith(shlex.join([*ARGS, "--tracking_uri", first]))

    assert main.main(["--config", str(tmp_path / "config.yaml"), "--tracking_uri", again]) == 0
    again_client, rerun = the_run(again)
    assert accuracies(again_client, rerun) == accuracies(client, run)
    assert len(accuracies(client, run)["acc_class_il"]) == 5


def test_the_console_output_is_an_artifact_of_the_run(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main.main([*ARGV, "--tracking_uri", uri]) == 0
    printed = capsys.readouterr().out
    client, run = the_run(uri)
    console = open(client.download_artifacts(run.info.run_id, "console.txt", str(tmp_path))).read()
    assert "class-il accuracy (%)" in console and f"MLflow run {run.info.run_id}" in console
    assert console.strip() in printed  # what the console showed, up to the closing pointer


class Stop(KeyboardInterrupt):
    """Ctrl-C, as the program sees it."""


@pytest.mark.parametrize("stopped_in_task, continues", [(2, True), (0, False)])
def test_ctrl_c_marks_the_run_killed_and_says_how_to_continue(tmp_path, monkeypatch, capsys, stopped_in_task,
                                                              continues):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    argv = [*ARGV, "--tracking_uri", uri, "--checkpoint_dir", str(tmp_path / "c")]
    train_task = continual.training.train_task

    def interrupted(model, dataset, task, *rest):
        if task == stopped_in_task:
            raise Stop()
        return train_task(model, dataset, task, *rest)

    monkeypatch.setattr(continual.training, "train_task", interrupted)
    assert main.main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("stopped by Ctrl-C; the MLflow runs it had opened are marked KILLED")
    client, run = the_run(uri)
    assert run.info.status == "KILLED"
    assert "console.txt" in [a.path for a in client.list_artifacts(run.info.run_id)]
    if not continues:
        assert "no task had finished, so there is no checkpoint" in err and not list((tmp_path / "c").glob("*.pt"))
        return
    checkpoint = tmp_path / "c" / f"{run.info.run_id}.pt"  # without --savecheck: the recovery checkpoint
    assert torch.load(checkpoint, weights_only=True)["next_task"] == 2
    command = err.split("continue with:\n", 1)[1].strip()
    assert command.endswith(shlex.join([*argv, "--resume", str(checkpoint)]))
    monkeypatch.setattr(continual.training, "train_task", train_task)
    assert main.main(shlex.split(command)[2:]) == 0
    client, run = the_run(uri)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "acc_class_il")]
    assert run.info.status == "FINISHED" and len(steps) == len(set(steps)) == 5  # each task once
    assert not checkpoint.exists()  # a recovery checkpoint is removed when its run finishes


def test_a_run_on_a_score_file_is_tagged_with_the_evaluation_run_that_computed_it(tmp_path):
    import numpy as np

    from memorization.score_format import file_digest, record_score_run, save_scores

    scores = np.linspace(0, 1, 1438, dtype=np.float32)
    save_scores(tmp_path / "scores.npy", scores, {"dataset": "seq-digits", "n": 1438})
    record_score_run(tmp_path / "scores.npy", scores, "0123abcd", "sqlite:///elsewhere.db")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main.main(["--model", "maer", "--buffer_policy", "max", "--buffer_size", "40", "--lr", "0.1", "--n_epochs",
                      "1", "--n_tasks", "2", "--mem_scores", str(tmp_path / "scores.npy"), "--mem_proxy", "none",
                      "--seed", "0", "--non_verbose", "--no_figures", "--tracking_uri", uri]) == 0
    _, run = the_run(uri)
    assert run.data.tags["mem_scores_run_id"] == "0123abcd"
    assert run.data.tags["mem_scores_tracking_uri"] == "sqlite:///elsewhere.db"
    assert run.data.tags["mem_scores_sha256"] == file_digest(tmp_path / "scores.npy")


@pytest.mark.parametrize("flags, kept", [(["--savecheck", "task"], ["", "_task1", "_task2"]),
                                         (["--savecheck", "last"], [""]), (["--savecheck"], [""]), ([], [])],
                         ids=["task", "last", "bare", "none"])
def test_savecheck_keeps_a_checkpoint_per_task_or_the_last_one(tmp_path, flags, kept):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    folder = tmp_path / "c"
    assert main.main([*ARGV, "--n_tasks", "2", "--tracking_uri", uri, "--checkpoint_dir", str(folder), *flags]) == 0
    _, run = the_run(uri)
    assert sorted(p.name for p in folder.glob("*.pt")) == sorted(f"{run.info.run_id}{k}.pt" for k in kept)
    for suffix in kept:
        tasks = int(suffix[5:]) if suffix else 2
        assert torch.load(folder / f"{run.info.run_id}{suffix}.pt", weights_only=True)["next_task"] == tasks
    assert ("checkpoint" in run.data.tags) == bool(kept)
