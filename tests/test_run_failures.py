"""No MLflow run is left RUNNING: a failure closes it FAILED with one sentence, and a run whose process died
is marked KILLED by the next run on the same machine."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

import continual.run
import main
from tests.conftest import REPO_ROOT

ARGV = ["--model", "er", "--dataset", "seq-digits", "--buffer_size", "40", "--lr", "0.1", "--n_epochs", "1",
        "--seed", "0", "--non_verbose", "--no_figures"]


def error_line(err: str) -> str:
    """The one sentence a failure prints (MLflow may log its store's creation before it), and no traceback."""
    assert "Traceback" not in err
    (line,) = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    return line


def only_run(tracking_uri: str):
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("continual-learning").experiment_id])
    return client, run


def test_a_full_disk_at_checkpoint_time_closes_the_run_failed_in_one_sentence(tmp_path, tracking_uri, capsys,
                                                                              monkeypatch):
    save = continual.run.save_checkpoint

    def full_after_the_first(path, payload):
        if payload["next_task"] > 1:
            raise OSError(28, "No space left on device", str(path))
        save(path, payload)

    monkeypatch.setattr(continual.run, "save_checkpoint", full_after_the_first)
    code = main.main([*ARGV, "--tracking_uri", tracking_uri, "--savecheck", "--checkpoint_dir", str(tmp_path / "c")])
    err = error_line(capsys.readouterr().err)
    assert code == 1 and err.startswith("error: No space left on device") and "marked FAILED with 2 tasks finished" in err
    assert "--resume" in err and str(tmp_path / "c") in err  # the checkpoint after task 1 is still there
    client, run = only_run(tracking_uri)
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["error"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "acc_class_il")] == [1, 2]
    traceback = client.download_artifacts(run.info.run_id, "error/traceback.txt", str(tmp_path))
    assert "OSError" in open(traceback).read()


def test_a_buffer_too_large_for_memory_closes_the_run_failed_in_one_sentence(tracking_uri, capsys):
    argv = [a if a != "40" else str(10**13) for a in ARGV]
    code = main.main([*argv, "--tracking_uri", tracking_uri])
    err = error_line(capsys.readouterr().err)
    assert code == 1 and "out of memory" in err and "--buffer_size" in err, err
    _, run = only_run(tracking_uri)
    assert run.info.status == "FAILED"


@pytest.mark.slow  # a real process, killed
def test_a_run_whose_process_was_killed_is_marked_killed_by_the_next_run(tmp_path, tracking_uri):
    process = subprocess.Popen([sys.executable, "main.py", *ARGV, "--n_epochs", "50", "--tracking_uri", tracking_uri],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if line.startswith("MLflow run "):
            killed = line.split()[2]
            break
    os.kill(process.pid, signal.SIGKILL)  # before its first checkpoint: nothing could close the run
    process.wait(timeout=60)
    client = MlflowClient(tracking_uri)
    assert client.get_run(killed).info.status == "RUNNING"
    assert main.main([*ARGV, "--tracking_uri", tracking_uri]) == 0
    run = client.get_run(killed)
    assert run.info.status == "KILLED" and "process ended" in run.data.tags["killed"]
    finished = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_id != killed]
    assert [r.info.status for r in finished] == ["FINISHED"]


def test_resuming_a_run_the_store_no_longer_holds_continues_in_a_new_linked_run(tmp_path, tracking_uri, capsys):
    argv = [*ARGV, "--savecheck", "--checkpoint_dir", str(tmp_path / "c")]
    assert main.main([*argv, "--tracking_uri", tracking_uri]) == 0
    client, first = only_run(tracking_uri)
    (checkpoint,) = (tmp_path / "c").glob("*.pt")
    client.delete_run(first.info.run_id)
    capsys.readouterr()
    assert main.main([*argv, "--tracking_uri", tracking_uri, "--resume", str(checkpoint)]) == 0
    assert f"the checkpoint's MLflow run {first.info.run_id} is not in" in capsys.readouterr().out
    (run,) = client.search_runs([first.info.experiment_id])
    assert run.info.run_id != first.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_run"] == first.info.run_id and run.data.tags["resumed_after_task"] == "5"


def test_mlflow_tracking_uri_in_the_environment_is_the_default_store(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main.main(ARGV) == 0
    assert f"in {uri}" in capsys.readouterr().out
    _, run = only_run(uri)
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize("script, argv", [
    (main, ["--model", "sgd", "--lr", "0.1", "--seed", "-1"]),
    (__import__("train_splits"), ["--lr", "0.1", "--n_models", "2", "--seed", "-1"]),
], ids=["main.py", "train_splits.py"])
def test_a_negative_seed_is_refused_in_one_sentence_before_anything_is_written(script, argv, tmp_path, capsys):
    code = script.main([*argv, "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}",
                        *(["--out", str(tmp_path / "store")] if script is not main else [])])
    assert code == 2 and error_line(capsys.readouterr().err).startswith("error: --seed must be in [0, 4294967295]")
    assert not (tmp_path / "store").exists() and not (tmp_path / "m.db").exists()


def test_an_experiment_named_dot_dot_keeps_its_artifacts_inside_mlruns(tmp_path):
    from utils.mlflow_logger import RunLogger

    logger = RunLogger(f"sqlite:///{tmp_path / 'm.db'}", "..")
    logger.log_text("x", "a.txt")
    logger.finish()
    experiment = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_experiment_by_name("..")
    assert experiment.artifact_location.startswith((tmp_path / "mlruns").as_uri() + "/")
    assert list((tmp_path / "mlruns").rglob("a.txt")) and not list(tmp_path.glob("*/a.txt"))


def test_a_checkpoint_being_resumed_cannot_be_resumed_again_at_the_same_time(tmp_path, tracking_uri, capsys):
    from filelock import FileLock

    argv = [*ARGV, "--tracking_uri", tracking_uri, "--savecheck", "--checkpoint_dir", str(tmp_path / "c")]
    assert main.main(argv) == 0
    (checkpoint,) = (tmp_path / "c").glob("*.pt")
    with FileLock(f"{checkpoint}.lock"):  # held as a resuming process holds it
        assert main.main([*argv, "--resume", str(checkpoint)]) == 2
        assert "is being resumed by another process" in error_line(capsys.readouterr().err)
    assert main.main([*argv, "--resume", str(checkpoint)]) == 0


@pytest.mark.parametrize("path", ["a?b/m.db", "a%20b/m.db"])
def test_a_sqlite_path_that_a_uri_would_misread_is_refused(tmp_path, capsys, path):
    (tmp_path / path).parent.mkdir()
    assert main.main([*ARGV, "--tracking_uri", f"sqlite:///{tmp_path / path}"]) == 2
    assert "holds ?, % or #" in error_line(capsys.readouterr().err)
    assert not list(tmp_path.rglob("*.db"))


def test_an_output_folder_that_cannot_be_written_ends_with_one_sentence(tmp_path, capsys):
    import train_splits

    (tmp_path / "file").write_text("a file where the store's folder would be")
    code = train_splits.main(["--lr", "0.1", "--n_models", "2", "--n_epochs", "1", "--out", str(tmp_path / "file" / "s"),
                              "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}", "--non_verbose"])
    assert code == 1 and str(tmp_path / "file") in error_line(capsys.readouterr().err)


def test_rerunning_a_finished_store_adds_no_mlflow_run(tmp_path, capsys):
    import train_splits

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    argv = ["--lr", "0.1", "--n_models", "2", "--n_epochs", "1", "--out", str(tmp_path / "s"), "--tracking_uri", uri,
            "--non_verbose", "--mlp_hidden", "16"]
    assert train_splits.main(argv) == 0
    client = MlflowClient(uri)

    def runs():
        return client.search_runs([e.experiment_id for e in client.search_experiments()])

    assert len(runs()) == 1
    assert train_splits.main(argv) == 0
    assert "2 stored, 0 to train" in capsys.readouterr().out
    assert len(runs()) == 1


def test_zero_pool_workers_are_refused_before_the_plan_or_a_run_is_written(tmp_path, capsys):
    import train_splits

    code = train_splits.main(["--lr", "0.1", "--n_models", "2", "--n_epochs", "1", "--out", str(tmp_path / "s"),
                              "--launcher", "pool", "--workers", "0", "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert code == 2 and "--workers must be at least 1, got 0" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "s").exists() and not (tmp_path / "m.db").exists()
