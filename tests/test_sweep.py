"""sweep.py: cells in MLflow under one parent, selection on the named metric, resume, report, bad files."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

import sweep as sweep_py
from continual.sweep import run_sweep
from utils.errors import ConfigError
from continual.sweep_runs import run_cell
from continual.sweep_spec import load_sweep

pytestmark = pytest.mark.slow  # real processes, clusters or servers: run by CI, not by `-m "not slow"`

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE = {"dataset": "seq-digits", "model": "sgd", "n_epochs": 1, "batch_size": 32, "mlp_hidden": 32}
# 2 methods × 2 settings × 2 search seeds, then the chosen settings with 2 final seeds: 12 runs.
SPEC = {
    "name": "digits-test",
    "base": BASE,
    "methods": {
        "vanilla": {"grid": {"lr": [1.0e-4, 0.1]}},
        "redo": {"flags": {"plasticity": "redo", "lr": 0.1, "redo_every": 5}, "grid": {"redo_tau": [0.0, 0.5]}},
    },
    "selection": {"metric": "acc_class_il"},
    "search_seeds": [0, 1],
    "final_seeds": [2, 3],
}


def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def children(tracking_uri: str, name: str) -> list:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    return [] if experiment is None else client.search_runs([experiment.experiment_id],
                                                           "tags.sweep_role = 'cell'", max_results=1000)


def parents(tracking_uri: str, name: str) -> list:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], "tags.sweep_role = 'parent'",
                              order_by=["attributes.start_time DESC"])


def sweep_args(path: Path, tmp_path: Path, *extra: str):
    return sweep_py.parse_args([str(path), "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                                "--out", str(tmp_path / "report"), *extra])


@pytest.fixture(scope="module")
def ray_sweep(tmp_path_factory, ray_cluster):
    """The test sweep, run once on the shared local Ray cluster."""
    folder = tmp_path_factory.mktemp("ray_sweep")
    path = write(folder / "digits.yaml", SPEC)
    result = run_sweep(sweep_args(path, folder, "--launcher", "ray"))
    return folder, path, result


def test_children_and_parent_are_in_mlflow(ray_sweep):
    folder, _, result = ray_sweep
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    assert result["ran"] == 12
    [parent] = parents(uri, "digits-test")
    runs = children(uri, "digits-test")
    assert len(runs) == 12
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.tags["sweep_phase"] for r in runs) == ["final"] * 4 + ["search"] * 8
    # each child is a full main.py run: its arguments, per-task metrics and figures
    run = runs[0]
    assert run.data.params["dataset"] == "seq-digits" and run.data.params["n_epochs"] == "1"
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "acc_class_il")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "accuracy")}
    assert {"accuracy/class_il.csv", "accuracy/terminal.png"} <= artifacts
    assert parent.info.status == "FINISHED"


def test_the_chosen_configuration_has_the_best_mean_selection_metric(ray_sweep):
    folder, _, result = ray_sweep
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    runs = [r for r in children(uri, "digits-test") if r.data.tags["sweep_phase"] == "search"]
    [parent] = parents(uri, "digits-test")
    for method in ("vanilla", "redo"):
        means = {}
        for config in {r.data.tags["sweep_config"] for r in runs if r.data.tags["sweep_method"] == method}:
            values = [r.data.metrics["acc_class_il"] for r in runs
                      if r.data.tags["sweep_method"] == method and r.data.tags["sweep_config"] == config]
            assert len(values) == 2  # both search seeds
            means[config] = np.mean(values)
        assert len(means) == 2
        best = max(means, key=means.get)
        assert parent.data.params[f"chosen/{method}"] == best
        assert ", ".join(f"{k}={v}" for k, v in result["chosen"][method].items()) == best
    assert parent.data.params["chosen/vanilla"] == "lr=0.1"  # lr 1e-4 barely learns in one epoch


def test_report_gives_mean_and_std_over_the_final_seeds(ray_sweep):
    folder, _, _ = ray_sweep
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    finals = [r for r in children(uri, "digits-test") if r.data.tags["sweep_phase"] == "final"]
    with open(folder / "report" / "summary.csv") as f:
        summary = {(row["method"], row["metric"]): row for row in csv.DictReader(f)}
    for method in ("vanilla", "redo"):
        for metric in ("acc_class_il", "terminal_test_acc", "train_acc/terminal", "forgetting_class_il"):
            values = [r.data.metrics[metric] for r in finals if r.data.tags["sweep_method"] == method]
            row = summary[(method, metric)]
            assert float(row["mean"]) == pytest.approx(np.mean(values))
            assert float(row["std"]) == pytest.approx(np.std(values, ddof=1))
            assert row["n_runs"] == "2"
    # resets per task: redo resets units, vanilla has none
    assert float(summary[("redo", "resets_per_task")]["mean"]) > 0
    assert float(summary[("vanilla", "resets_per_task")]["mean"]) == 0
    with open(folder / "report" / "per_task.csv") as f:
        per_task = list(csv.DictReader(f))
    assert len(per_task) == 4 * 5  # 4 final runs × 5 tasks
    assert [row["task"] for row in per_task[:5]] == ["1", "2", "3", "4", "5"]
    report = (folder / "report" / "report.md").read_text()
    vanilla_final = [r.data.metrics["acc_class_il"] for r in finals if r.data.tags["sweep_method"] == "vanilla"]
    assert f"{np.mean(vanilla_final):.2f} ± {np.std(vanilla_final, ddof=1):.2f}" in report
    # sectioned summaries are rows of the table, per-layer breakdowns and per-task values are not
    assert "| plasticity/resets |" in report and "| train_acc/terminal |" in report
    assert "plasticity/resets/" not in report and "_per_task/" not in report and "epoch/" not in report
    for name in ("terminal_accuracy.png", "resets.png", "runs.csv"):
        assert (folder / "report" / name).stat().st_size > 0
    [parent] = parents(uri, "digits-test")
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/terminal_accuracy.png", "report/resets.png", "report/summary.csv",
            "report/runs.csv", "report/per_task.csv"} <= logged
    assert parent.data.metrics["vanilla/acc_class_il"] == pytest.approx(np.mean(vanilla_final))


def test_report_only_rebuilds_the_same_report_and_rerunning_runs_nothing(ray_sweep, tmp_path):
    folder, path, _ = ray_sweep
    before = (folder / "report" / "report.md").read_text()
    (folder / "report" / "report.md").unlink()
    result = run_sweep(sweep_args(path, folder, "--report_only"))
    assert result["ran"] == 0
    assert (folder / "report" / "report.md").read_text() == before
    assert run_sweep(sweep_args(path, folder, "--launcher", "ray"))["ran"] == 0
    assert len(children(f"sqlite:///{folder / 'mlflow.db'}", "digits-test")) == 12


def test_a_changed_sweep_file_runs_only_the_new_cells(tmp_path):
    spec = {**SPEC, "name": "changed", "methods": {"vanilla": {"grid": {"lr": [0.1]}}}}
    path = write(tmp_path / "sweep.yaml", spec)
    assert run_sweep(sweep_args(path, tmp_path))["ran"] == 4  # 2 search + 2 final
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first_runs = {r.info.run_id for r in children(uri, "changed")}
    spec["methods"]["vanilla"]["grid"]["lr"] = [0.1, 1.0e-5]
    write(path, spec)
    result = run_sweep(sweep_args(path, tmp_path))
    assert result["ran"] == 2  # the new setting's search seeds; the choice stays lr 0.1, its finals are reused
    new, old = parents(uri, "changed")
    assert old.data.tags["superseded_by"] == new.info.run_id
    runs = children(uri, "changed")
    assert first_runs < {r.info.run_id for r in runs} and len(runs) == 6
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {new.info.run_id}


def test_a_diverged_setting_is_recorded_never_chosen_and_not_run_again(tmp_path):
    spec = {**SPEC, "name": "diverging", "methods": {"vanilla": {"grid": {"lr": [1.0e30, 0.1]}}},
            "final_seeds": [2]}
    path = write(tmp_path / "sweep.yaml", spec)
    result = run_sweep(sweep_args(path, tmp_path))
    assert result["chosen"]["vanilla"] == {"lr": 0.1}
    runs = children(f"sqlite:///{tmp_path / 'mlflow.db'}", "diverging")
    diverged = [r for r in runs if r.data.tags["sweep_outcome"] == "diverged"]
    assert len(diverged) == 2 and {r.info.status for r in diverged} == {"FAILED"}
    assert "lower --lr" in diverged[0].data.tags["error"]
    assert run_sweep(sweep_args(path, tmp_path))["ran"] == 0


def test_killing_the_sweep_and_rerunning_it_runs_only_the_unfinished_cells(tmp_path, ray_cluster):
    spec = {**SPEC, "name": "killed", "base": {**BASE, "n_epochs": 4}}
    path = write(tmp_path / "sweep.yaml", spec)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    driver = subprocess.Popen([sys.executable, str(REPO_ROOT / "sweep.py"), str(path), "--tracking_uri", uri,
                               "--out", str(tmp_path / "report"), "--launcher", "ray", "--address", ray_cluster],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp_path, text=True)
    assert driver.stdout.readline().startswith("new sweep killed")  # the store exists from here on
    deadline = time.time() + 240
    finished = []
    while time.time() < deadline and len(finished) < 3:
        time.sleep(0.5)
        finished = [r for r in children(uri, "killed") if r.info.status == "FINISHED"]
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    finished = {r.data.tags["sweep_cell"]: r.info.run_id for r in children(uri, "killed")
                if r.info.status == "FINISHED"}
    assert 3 <= len(finished) < 12, "the driver was killed after some cells and before the end"
    result = run_sweep(sweep_args(path, tmp_path, "--launcher", "ray"))
    assert result["ran"] == 12 - len(finished)
    runs = [r for r in children(uri, "killed") if r.info.status == "FINISHED"]
    assert len(runs) == 12 and len({r.data.tags["sweep_cell"] for r in runs}) == 12
    assert {r.data.tags["sweep_cell"]: r.info.run_id for r in runs if r.data.tags["sweep_cell"] in finished} == finished


def test_a_killed_cell_resumes_from_its_checkpoint_with_the_same_record(tmp_path):
    """A cell killed after some tasks continues from its checkpoint; its record equals an uninterrupted one."""
    argv = ["--dataset", "seq-digits", "--model", "sgd", "--n_epochs", "6", "--batch_size", "32", "--lr", "0.1",
            "--mlp_hidden", "32", "--seed", "5", "--plasticity", "redo", "--redo_every", "7"]
    whole = run_cell("whole", argv, str(tmp_path / "whole"))
    assert whole["outcome"] == "finished"
    code = ("import sys; from continual.sweep_runs import run_cell; "
            f"run_cell('cut', {argv!r}, {str(tmp_path / 'cut')!r})")
    worker = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "cut" / "cut.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and worker.poll() is None:
        time.sleep(0.05)
    worker.kill()
    worker.wait()
    assert checkpoint.exists(), "the worker was killed after its first task"
    resumed = run_cell("cut", argv, str(tmp_path / "cut"))
    assert resumed["outcome"] == "finished"

    def metrics(record):
        return sorted((k, s, v) for k, v, _, s in record["metrics"])

    assert metrics(resumed["record"]) == metrics(whole["record"])
    assert set(resumed["record"]["artifacts"]) == set(whole["record"]["artifacts"])


@pytest.mark.parametrize("change, words", [
    ({"methods": {"snr": {"flags": {"plasticity": "snrr"}}}}, "unknown plasticity method 'snrr'"),
    ({"methods": {"l2": {"flags": {"plasticity": "l2"}, "grid": {"l2_lamda": [1e-3]}}}}, "l2_lamda"),
    ({"methods": {"l2": {"flags": {"plasticity": "l2"}, "grid": {}}}}, "has an empty grid"),
    ({"methods": {"l2": {"flags": {"plasticity": "l2"}, "grid": {"l2_lambda": []}}}}, "no values for l2_lambda"),
    ({"selection": {"metric": "terminal_test_acc_last_7"}}, "is not logged by the runs"),
    ({"selection": {"metric": "terminal_test_acc_last_10"}}, "logs a _last_K mean only for K below 5"),
    ({"base": {**BASE, "dataset": "random-label-digits"}, "selection": {"metric": "acc_class_il"}},
     "is not logged by the runs"),
    ({"methods": {"a": {"reuse": "b"}, "b": {"reuse": "a"}}}, "in a circle"),
    ({"base": {**BASE, "seed": 3}}, "which the sweep sets itself"),
    ({"methods": {"vanilla": {"grid": {"lr": ["fast"]}}}}, "invalid float value"),
    ({"final_seeds": []}, "non-empty list of integer seeds"),
    ({"methods": {"er+replay": {"flags": {"model": "er"}}}}, "becomes MLflow keys and file names"),
])
def test_bad_sweep_files_fail_before_anything_runs(tmp_path, capsys, change, words):
    path = write(tmp_path / "bad.yaml", {**SPEC, **change})
    with pytest.raises(ConfigError, match=words):
        load_sweep(path)
    code = sweep_py.main([str(path), "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                          "--out", str(tmp_path / "report")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and words in error
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "report").exists()


def test_a_missing_sweep_file_and_report_only_before_a_run_are_one_sentence(tmp_path, capsys):
    assert sweep_py.main([str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    path = write(tmp_path / "sweep.yaml", SPEC)
    assert sweep_py.main([str(path), "--report_only", "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    assert "run it (without --report_only) first" in capsys.readouterr().err


def test_a_method_that_reuses_others_starts_from_their_chosen_configurations(tmp_path):
    spec = {**SPEC, "name": "reuse", "final_seeds": [2], "methods": {
        "vanilla": {"grid": {"lr": [1.0e-4, 0.1]}},
        "l2": {"flags": {"plasticity": "l2", "lr": 0.1}, "grid": {"l2_lambda": [1.0e-1, 1.0e-5]}},
        "l2_redo": {"flags": {"plasticity": "l2,redo", "redo_every": 5}, "reuse": ["vanilla", "l2"]},
    }}
    path = write(tmp_path / "sweep.yaml", spec)
    result = run_sweep(sweep_args(path, tmp_path))
    chosen = result["chosen"]
    assert chosen["l2_redo"] == {**chosen["vanilla"], **chosen["l2"]}
    assert result["ran"] == 4 + 4 + 2 + 3  # two 2-setting searches, one reused setting, one final each
    runs = [r for r in children(f"sqlite:///{tmp_path / 'mlflow.db'}", "reuse")
            if r.data.tags["sweep_method"] == "l2_redo"]
    assert {(r.data.params["lr"], r.data.params["l2_lambda"]) for r in runs} == {
        (str(chosen["vanilla"]["lr"]), str(chosen["l2"]["l2_lambda"]))}


LAUNCHER_SPEC = {**SPEC, "name": "launchers", "methods": {"vanilla": {"grid": {"lr": [0.05, 0.1]}}},
                 "search_seeds": [0], "final_seeds": [1]}


def cell_results(folder: Path, *launcher: str) -> dict[str, float]:
    """Run the 3-cell launcher sweep into `folder`; acc_class_il of each cell."""
    folder.mkdir()
    path = write(folder / "sweep.yaml", LAUNCHER_SPEC)
    assert run_sweep(sweep_args(path, folder, *launcher))["ran"] == 3
    return {r.data.tags["sweep_cell"]: r.data.metrics["acc_class_il"]
            for r in children(f"sqlite:///{folder / 'mlflow.db'}", "launchers")}


@pytest.fixture(scope="module")
def in_process_results(tmp_path_factory):
    return cell_results(tmp_path_factory.mktemp("in_process") / "sweep")


@pytest.mark.parametrize("launcher", [["--launcher", "pool", "--max_parallel", "2"],
                                      ["--launcher", "slurm", "--submitit_cluster", "local"]])
def test_pool_and_slurm_launchers_give_the_cells_the_same_results_as_in_process(tmp_path, launcher,
                                                                                 in_process_results):
    assert len(in_process_results) == 3
    assert cell_results(tmp_path / "sweep", *launcher) == in_process_results


def test_runs_log_every_metric_a_sweep_may_select_on(ray_sweep):
    from datasets import DATASETS
    from continual.evaluation import logged_summary_metrics

    folder, _, _ = ray_sweep
    selectable = logged_summary_metrics(DATASETS.get("seq-digits"), 5, "seen", [50, 10])
    for run in children(f"sqlite:///{folder / 'mlflow.db'}", "digits-test"):
        assert selectable <= set(run.data.metrics)


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_are_valid(path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # their --config paths are relative to the repository
    sweep = load_sweep(path)
    assert sweep.search_seeds and sweep.final_seeds and not set(sweep.search_seeds) & set(sweep.final_seeds)
    if path.name.startswith("imagenet"):
        assert sweep.metric == "terminal_test_acc_last_50" and len(sweep.search_seeds) == 5
        assert len(sweep.methods["snr_v2"].configurations({})) == 4 * 8


def test_a_missing_dataset_ends_with_one_sentence_and_starts_no_further_cell(tmp_path, capsys):
    spec = {**SPEC, "name": "no-data", "base": {**BASE, "dataset": "seq-mnist", "data_path": str(tmp_path / "empty")}}
    path = write(tmp_path / "sweep.yaml", spec)
    code = sweep_py.main([str(path), "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                          "--out", str(tmp_path / "report")])
    error = [line for line in capsys.readouterr().err.strip().splitlines() if " INFO mlflow." not in line]
    assert code == 2 and len(error) == 1
    assert "MNIST" in error[0] and "no further cell was started" in error[0]
    assert children(f"sqlite:///{tmp_path / 'mlflow.db'}", "no-data") == []
    [parent] = parents(f"sqlite:///{tmp_path / 'mlflow.db'}", "no-data")
    assert parent.info.status == "FAILED"


def test_a_corrupt_cell_checkpoint_is_kept_aside_and_the_cell_starts_again(tmp_path, capsys):
    argv = ["--dataset", "seq-digits", "--model", "sgd", "--n_epochs", "1", "--lr", "0.1", "--seed", "4"]
    (tmp_path / "cell.pt").write_bytes(b"not a checkpoint")
    result = run_cell("cell", argv, str(tmp_path))
    assert result["outcome"] == "finished"
    assert (tmp_path / "cell.pt.refused").read_bytes() == b"not a checkpoint"
    assert "not resuming" in capsys.readouterr().err
    fresh = run_cell("fresh", argv, str(tmp_path / "fresh"))
    assert sorted((k, s, v) for k, v, _, s in result["record"]["metrics"]) == \
        sorted((k, s, v) for k, v, _, s in fresh["record"]["metrics"])
