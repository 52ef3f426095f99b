"""What a resumed run records: each point once, in the store the command names, from a checkpoint that holds
together."""
from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

import continual.run
import main
from tests.test_run_failures import ARGV, error_line

ARGS = [*ARGV, "--n_tasks", "2"]


class Killed(BaseException):
    """A kill -9 as the run sees it: nothing closes the run, nothing after it is written."""


def points(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}


def test_a_kill_between_a_tasks_logging_and_its_checkpoint_logs_no_point_twice(tmp_path, monkeypatch):
    uri, other = f"sqlite:///{tmp_path / 'm.db'}", f"sqlite:///{tmp_path / 'other.db'}"
    argv = [*ARGS, "--savecheck", "--checkpoint_dir", str(tmp_path / "c")]
    save = continual.run.save_checkpoint

    def killed_before_the_second(path, payload):
        if payload["next_task"] == 2:  # task 2 is logged, its checkpoint never written
            raise Killed()
        save(path, payload)

    monkeypatch.setattr(continual.run, "save_checkpoint", killed_before_the_second)
    with pytest.raises(Killed):
        main.main([*argv, "--tracking_uri", uri])
    monkeypatch.setattr(continual.run, "save_checkpoint", save)
    (checkpoint,) = (tmp_path / "c").glob("*.pt")
    assert torch.load(checkpoint, weights_only=True)["next_task"] == 1
    assert main.main([*argv, "--tracking_uri", uri, "--resume", str(checkpoint)]) == 0
    assert main.main([*ARGS, "--tracking_uri", other]) == 0

    client = MlflowClient(uri)
    (resumed,) = client.search_runs([client.get_experiment_by_name("continual-learning").experiment_id])
    other_client = MlflowClient(other)
    (uninterrupted,) = other_client.search_runs([other_client.get_experiment_by_name("continual-learning").experiment_id])
    logged = points(client, resumed.info.run_id)
    assert len(logged["acc_class_il"]) == 2
    assert logged == points(other_client, uninterrupted.info.run_id)  # every point once, with the same value


def test_a_resumed_run_logs_to_the_store_its_command_names(tmp_path, capsys):
    first, second = f"sqlite:///{tmp_path / 'first.db'}", f"sqlite:///{tmp_path / 'second.db'}"
    argv = [*ARGS, "--savecheck", "--checkpoint_dir", str(tmp_path / "c")]
    assert main.main([*argv, "--tracking_uri", first]) == 0
    (checkpoint,) = (tmp_path / "c").glob("*.pt")
    assert main.main([*argv, "--tracking_uri", second, "--resume", str(checkpoint)]) == 0
    assert f"is not in {second}" in capsys.readouterr().out
    client = MlflowClient(second)
    (run,) = client.search_runs([client.get_experiment_by_name("continual-learning").experiment_id])
    assert run.data.tags["resumed_from_store"] == first
    assert len(MlflowClient(first).search_runs([run.info.experiment_id])) == 1  # the first store got nothing new


@pytest.mark.parametrize("field, value, named", [
    ("next_task", 7, "next_task"),
    ("next_task", 0, "next_task"),
    ("matrices", {"class_il": torch.zeros(3, 3), "task_il": torch.zeros(3, 3)}, "matrices"),
    ("model", {}, "model"),
    ("epoch_losses", "nan", "epoch_losses"),
])
def test_a_well_formed_checkpoint_with_inconsistent_fields_is_refused_in_one_sentence(tmp_path, capsys, field, value,
                                                                                     named):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    argv = [*ARGS, "--tracking_uri", uri, "--savecheck", "--checkpoint_dir", str(tmp_path / "c")]
    assert main.main(argv) == 0
    (checkpoint,) = (tmp_path / "c").glob("*.pt")
    payload = torch.load(checkpoint, weights_only=True)
    payload[field] = value
    torch.save(payload, checkpoint)
    before = checkpoint.read_bytes()
    capsys.readouterr()
    assert main.main([*argv, "--resume", str(checkpoint)]) == 2
    err = error_line(capsys.readouterr().err)
    assert f"checkpoint {checkpoint} is inconsistent" in err and named in err, err
    assert checkpoint.read_bytes() == before
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("continual-learning").experiment_id])
    assert run.info.status == "FINISHED"  # the refused resume reopened nothing


def test_a_checkpoint_of_the_previous_format_is_refused_in_one_sentence(tmp_path, capsys):
    """Its history holds the previous metric names and 0-based task steps, which would mix into the resumed run."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    argv = [*ARGS, "--tracking_uri", uri, "--savecheck", "--checkpoint_dir", str(tmp_path / "c")]
    assert main.main(argv) == 0
    (checkpoint,) = (tmp_path / "c").glob("*.pt")
    payload = torch.load(checkpoint, weights_only=True)
    torch.save({**payload, "format": 3}, checkpoint)
    capsys.readouterr()
    assert main.main([*argv, "--resume", str(checkpoint)]) == 2
    assert "is not a checkpoint of this framework (format 3)" in error_line(capsys.readouterr().err)
