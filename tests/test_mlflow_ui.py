"""Where to look at a run: the direct link to its page and the UI command with this program's interpreter."""
from __future__ import annotations

import shlex
import socket
import sys

from mlflow.tracking import MlflowClient

import main
from tests.test_run_failures import ARGV
from utils.mlflow_ui import free_port, ui_command


def test_a_port_in_use_is_skipped():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert free_port(port) > port


def test_the_end_of_a_run_prints_its_link_and_a_command_that_serves_its_store(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main.main([*ARGV, "--tracking_uri", uri]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("continual-learning").experiment_id])
    tail = out[out.index("results: MLflow run"):].splitlines()
    assert tail[0] == f"results: MLflow run {run.info.run_id} in {uri}"
    port = int(tail[1].split(":")[2].split("/")[0])
    assert tail[1] == f"  open http://127.0.0.1:{port}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    command = shlex.split(tail[3])
    assert command[:4] == [sys.executable, "-m", "mlflow", "ui"] and command[-4:] == [
        "--backend-store-uri", uri, "--port", str(port)] and tail[3] == "  " + ui_command(uri, port)


def test_a_tracking_server_is_linked_directly():
    from utils.mlflow_ui import where_to_look

    lines = where_to_look("http://mlflow.example:8080/", "3", "abc").splitlines()
    assert lines == ["results: MLflow run abc in http://mlflow.example:8080/",
                     "  open http://mlflow.example:8080/#/experiments/3/runs/abc"]
