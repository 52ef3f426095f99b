"""What a researcher sees in MLflow: a run logged to a real server, and `mlflow ui` over the default store layout."""
from __future__ import annotations

import pytest

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.parse
import urllib.request

from tests.conftest import REPO_ROOT, start_mlflow, stop

pytestmark = pytest.mark.slow  # real processes, clusters or servers: run by CI, not by `-m "not slow"`

ARGS = ["--dataset", "seq-digits", "--model", "er", "--buffer_size", "100", "--lr", "0.1", "--n_epochs", "2",
        "--seed", "0", "--non_verbose", "--run_name", "digits-er"]


def rest(url: str, endpoint: str, **query) -> dict:
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as r:
        return json.loads(r.read())


def search_runs(url: str) -> list[dict]:
    experiment = rest(url, "experiments/get-by-name", experiment_name="continual-learning")["experiment"]
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["runs"]


def check_run_is_visible(url: str) -> None:
    """The run, its params, per-task metrics and artifacts, read back through the REST API the UI uses."""
    (run,) = search_runs(url)
    info, data = run["info"], run["data"]
    assert info["status"] == "FINISHED" and info["run_name"] == "digits-er"
    params = {p["key"]: p["value"] for p in data["params"]}
    assert params["model"] == "er" and params["buffer_size"] == "100" and params["n_epochs"] == "2"
    tags = {t["key"]: t["value"] for t in data["tags"]}
    assert tags["device"] == "cpu" and "torch_version" in tags
    history = rest(url, "metrics/get-history", run_id=info["run_id"], metric_key="acc_class_il")["metrics"]
    assert sorted(m["step"] for m in history) == [1, 2, 3, 4, 5]
    assert all(0 <= m["value"] <= 100 for m in history)
    listed = rest(url, "artifacts/list", run_id=info["run_id"], path="accuracy")["files"]
    assert {f["path"] for f in listed} >= {"accuracy/class_il.csv", "accuracy/class_il.png"}
    query = urllib.parse.urlencode({"path": "accuracy/class_il.png", "run_uuid": info["run_id"]})
    with urllib.request.urlopen(f"{url}/get-artifact?{query}", timeout=30) as response:
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_run_logged_to_a_real_server_is_readable_through_its_rest_api(mlflow_server, tmp_path):
    result = subprocess.run([sys.executable, "main.py", *ARGS, "--tracking_uri", mlflow_server], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    check_run_is_visible(mlflow_server)


def test_mlflow_ui_started_beside_the_store_shows_the_run_whatever_the_working_directory(tmp_path):
    store = tmp_path / "root"
    store.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # main.py runs from another folder; the store and its artifacts still land side by side.
    result = subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), *ARGS, "--tracking_uri",
                             f"sqlite:///{store / 'mlflow.db'}"], cwd=elsewhere, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (store / "mlruns" / "continual-learning").is_dir() and not (elsewhere / "mlruns").exists()
    process, url = start_mlflow(["ui"], store, tmp_path / "ui.log")  # plain `mlflow ui` in that folder
    try:
        check_run_is_visible(url)
    finally:
        stop(process)

    # The command the run printed works from anywhere, without an activated venv (no `mlflow` on PATH), and
    # its link names the run.
    pointer = result.stdout[result.stdout.index("results: MLflow run"):].splitlines()
    link, command = pointer[1].split()[1], shlex.split(pointer[3])
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    process = subprocess.Popen([*command, "--workers", "1"], cwd=elsewhere, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    base, run_id = link.split("/#/")[0], link.rsplit("/", 1)[1]
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                assert process.poll() is None, "the printed mlflow ui command ended"
                time.sleep(0.5)
        assert rest(base, "runs/get", run_id=run_id)["run"]["info"]["run_name"] == "digits-er"
    finally:
        stop(process)
