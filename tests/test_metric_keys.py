"""What a run's MLflow page shows: metric keys in sections (the part before the first "/"), a few headline keys
without one, one meaning of step per family, and tasks counted from 1 in names, steps, tables and figures."""
from __future__ import annotations

import argparse
import math
from collections import defaultdict

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from continual.args import parse_args
from continual.evaluation import empty_matrix, logged_summary_metrics, terminal_metrics, windows
from continual.records import matrix_csv, summary_table, terminal_csv
from continual.run import run as run_experiment
from continual.training import RunState, on_console
from datasets import DATASETS
from utils.plots import accuracy_heatmap, close

LOG_EVERY = 10
RUN = ["--dataset", "seq-digits", "--n_tasks", "2", "--n_epochs", "2", "--seed", "0", "--non_verbose", "--no_figures",
       "--model", "er", "--buffer_size", "40", "--lr", "0.1", "--buffer_policy", "min",
       "--plasticity", "redo", "--redo_every", "5", "--covariates", "--log_every", str(LOG_EVERY)]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A 2-task run that logs every family: per-task accuracies, memorization buckets (uniform random scores),
    plasticity, covariates per task and per step, and the model's record of its buffer."""
    folder = tmp_path_factory.mktemp("keys")
    scores = folder / "scores.npy"
    np.save(scores, np.random.default_rng(0).random(1438, dtype=np.float32))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    args = parse_args([*RUN, "--mem_scores", str(scores), "--tracking_uri", uri])
    state = run_experiment(args)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("continual-learning").experiment_id])
    steps = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                      key=lambda m: m.step)] for key in run.data.metrics}
    dataset = DATASETS.get("seq-digits")(args)
    return {"state": state, "client": client, "run": run, "steps": steps, "dataset": dataset, "folder": folder}


def sections(keys) -> dict[str, set[str]]:
    out = defaultdict(set)
    for key in keys:
        out[key.split("/", 1)[0] if "/" in key else ""].add(key)
    return out


def test_metrics_fall_into_sections_with_a_few_headline_keys_first(logged_run):
    by_section = sections(logged_run["steps"])
    assert by_section[""] == {"acc_class_il", "acc_task_il", "forgetting_class_il", "forgetting_task_il",
                              "bwt_class_il", "bwt_task_il", "terminal_test_acc"}
    assert set(by_section) == {"", "acc_class_il_per_task", "acc_task_il_per_task", "train_acc",
                               "train_acc_low_per_task", "train_acc_middle_per_task", "train_acc_high_per_task",
                               "epoch", "step", "plasticity", "covariates", "model"}
    assert by_section["acc_class_il_per_task"] == {"acc_class_il_per_task/task_1", "acc_class_il_per_task/task_2"}
    assert by_section["train_acc"] == {"train_acc/terminal", "train_acc/low", "train_acc/middle", "train_acc/high"}
    assert by_section["train_acc_high_per_task"] == {"train_acc_high_per_task/task_1", "train_acc_high_per_task/task_2"}
    assert by_section["epoch"] == {"epoch/train_loss"}
    layers = {key.rsplit("/", 1)[1] for key in by_section["plasticity"] if key.startswith("plasticity/resets/")}
    assert len(layers) == 2  # the MLP's two hidden layers
    assert by_section["plasticity"] == {"plasticity/resets", "plasticity/redo_checks",
                                        *(f"plasticity/resets/{layer}" for layer in layers)}
    assert {"covariates/dormant_frac", "covariates/effective_rank_mean", "covariates/age_steps_mean"} \
        <= by_section["covariates"]
    assert {f"covariates/dormant_frac/{layer}" for layer in layers} <= by_section["covariates"]
    assert {"step/dormant_frac", "step/weight_mean_abs"} <= by_section["step"]
    assert by_section["model"] == {"model/mem_values_undefined", *(f"model/buffer_count_class_{c}" for c in range(10))}
    assert not any("_last_" in key for key in logged_run["steps"])  # a 2-task run logs no window


def test_task_level_metrics_are_logged_at_the_number_of_tasks_trained(logged_run):
    steps, state = logged_run["steps"], logged_run["state"]
    class_il = state.matrices["class_il"]
    assert steps["acc_class_il"] == [(1, class_il[0, 0]), (2, pytest.approx(class_il[1, :2].mean()))]
    assert steps["acc_class_il_per_task/task_1"] == [(1, class_il[0, 0]), (2, class_il[1, 0])]
    assert steps["acc_class_il_per_task/task_2"] == [(2, class_il[1, 1])]
    assert [s for s, _ in steps["forgetting_class_il"]] == [2]
    assert steps["terminal_test_acc"] == [(1, class_il[0, 0]), (2, class_il[1, 1])]
    assert [v for _, v in steps["train_acc/terminal"]] == pytest.approx(state.history["train_acc/terminal"])
    task_level = [k for k in steps if not k.startswith(("epoch/", "step/"))]
    assert all({s for s, _ in steps[k]} <= {1, 2} for k in task_level)
    assert [s for s, _ in steps["plasticity/resets"]] == [s for s, _ in steps["covariates/dormant_frac"]] == [1, 2]
    assert [s for s, _ in steps["model/buffer_count_class_9"]] == [2]  # classes 5-9 are task 2's


def test_the_loss_is_logged_per_epoch_and_covariates_per_optimizer_step(logged_run):
    steps, state, dataset = logged_run["steps"], logged_run["state"], logged_run["dataset"]
    assert [s for s, _ in steps["epoch/train_loss"]] == [1, 2, 3, 4]  # 2 tasks × 2 epochs, counted over the run
    assert [v for _, v in steps["epoch/train_loss"]] == pytest.approx(state.epoch_losses)
    per_task = [2 * math.ceil(len(dataset.train_split(t)) / 32) for t in range(2)]
    expected = list(range(LOG_EVERY, sum(per_task) + 1, LOG_EVERY))
    assert [s for s, _ in steps["step/dormant_frac"]] == expected


def test_tables_and_artifacts_count_tasks_from_1(logged_run):
    client, run, state = logged_run["client"], logged_run["run"], logged_run["state"]
    table = client.download_artifacts(run.info.run_id, "accuracy/class_il.csv", str(logged_run["folder"]))
    lines = open(table).read().splitlines()
    m = state.matrices["class_il"]
    assert lines == ["after_task,task_1,task_2", f"1,{m[0, 0]:.4f},", f"2,{m[1, 0]:.4f},{m[1, 1]:.4f}"]
    terminal = client.download_artifacts(run.info.run_id, "accuracy/terminal.csv", str(logged_run["folder"]))
    assert [line.split(",")[0] for line in open(terminal).read().splitlines()] == ["task", "1", "2"]
    buffer = {a.path for a in client.list_artifacts(run.info.run_id, "buffer")}
    assert buffer == {"buffer/indices_task_1.npy", "buffer/indices_task_2.npy",
                      "buffer/values_task_1.png", "buffer/values_task_2.png"}


def test_the_matrix_csv_and_the_summary_table_name_tasks_from_1():
    matrix = empty_matrix(3)
    matrix[0, 0], matrix[1, :2], matrix[2] = 90.0, [80.0, 70.0], [60.0, 50.0, 40.0]
    assert matrix_csv(matrix) == ("after_task,task_1,task_2,task_3\n1,90.0000,,\n2,80.0000,70.0000,\n"
                                  "3,60.0000,50.0000,40.0000\n")
    assert terminal_csv(np.array([90.0, 70.0]), np.array([95.0, 75.0])) == \
        "task,terminal_test_acc,terminal_train_acc\n1,90.0000,95.0000\n2,70.0000,75.0000\n"
    state = RunState({"class_il": matrix}, next_task=3)
    lines = summary_table(state, argparse.Namespace(eval_scope="seen", last_k=[50, 10])).splitlines()
    assert lines[2].split() == ["task", "1", "task", "2", "task", "3"]
    assert [line.split()[:3] for line in lines[3:6]] == [["after", "1", "90.00"], ["after", "2", "80.00"],
                                                         ["after", "3", "60.00"]]
    assert lines[6] == "acc_class_il: 50.00  forgetting_class_il: 25.00  bwt_class_il: -25.00"


def test_the_heatmap_axes_read_as_task_numbers():
    matrix = empty_matrix(3)
    matrix[0, 0], matrix[2, 1] = 90.0, 55.0
    figure = accuracy_heatmap(matrix, "class-il")
    axes = figure.axes[0]
    assert list(axes.get_xticks()) == list(axes.get_yticks()) == [1, 2, 3]
    assert {(text.get_position(), text.get_text()) for text in axes.texts} == {((1, 1), "90"), ((2, 3), "55")}
    close(figure)
    figure = accuracy_heatmap(np.full((30, 30), 50.0), "a long stream")
    axes = figure.axes[0]
    assert axes.get_xlim() == (0.5, 30.5) and axes.get_ylim() == (30.5, 0.5)  # cell (t, i) centred on (i+1, t+1)
    assert all(tick == int(tick) for tick in axes.get_xticks())
    close(figure)


def test_a_window_is_logged_only_for_runs_longer_than_it():
    assert windows([50, 10], 5) == [] and windows([50, 10, 3], 5) == [3] and windows([3, 3], 4) == [3]
    terminal = np.array([10.0, 20.0, 30.0, 40.0])
    assert terminal_metrics(terminal[:2], "t", [3]) == {"t": 20.0}  # the window is not full yet
    assert terminal_metrics(terminal, "t", [3]) == {"t": 40.0, "t_last_3": 30.0}
    digits = DATASETS.get("seq-digits")
    assert logged_summary_metrics(digits, 5, "seen", [50, 10]) == {
        "terminal_test_acc", "train_acc/terminal", "acc_class_il", "acc_task_il", "forgetting_class_il",
        "forgetting_task_il", "bwt_class_il", "bwt_task_il"}
    assert logged_summary_metrics(DATASETS.get("random-label-digits"), 20, "current", [50, 5]) == {
        "terminal_test_acc", "terminal_test_acc_last_5", "train_acc/terminal", "train_acc/terminal_last_5",
        "terminal_test_acc_last_10pct"}  # SNR's summary of a stream of 10 tasks or more
    assert logged_summary_metrics(digits, 1, "seen", [50]) == {"terminal_test_acc", "train_acc/terminal",
                                                               "acc_class_il", "acc_task_il"}


def test_the_console_shows_the_windows_a_run_logs():
    matrix = empty_matrix(4)
    state = RunState({"domain_il": matrix}, next_task=4,
                     history={"terminal_test_acc": [10.0, 20.0, 30.0, 40.0], "train_acc/terminal": [1.0, 2, 3, 4]})
    text = summary_table(state, argparse.Namespace(eval_scope="current", last_k=[50, 4, 2]))
    assert text.splitlines() == ["terminal test accuracy (%), mean over all 4 tasks: 25.00  last 2: 35.00",
                                 "terminal training accuracy (%), mean over all 4 tasks: 2.50  last 2: 3.50"]
    shown = [k for k in ("acc_class_il", "acc_class_il_per_task/task_1", "bwt_class_il", "terminal_test_acc",
                         "terminal_test_acc_last_5", "train_acc/terminal", "train_acc/high", "plasticity/resets",
                         "plasticity/resets/fc1", "covariates/dormant_frac", "epoch/train_loss") if on_console(k)]
    assert shown == ["acc_class_il", "terminal_test_acc", "train_acc/terminal", "plasticity/resets",
                     "covariates/dormant_frac"]


def test_the_covariate_figures_keep_their_names_under_plasticity():
    from utils.mlflow_logger import RecordingLogger

    logger = RecordingLogger(run_id="figures")
    run_experiment(parse_args(["--dataset", "seq-digits", "--n_tasks", "2", "--n_epochs", "1", "--seed", "0",
                               "--non_verbose", "--model", "sgd", "--lr", "0.1", "--covariates"]), logger)
    figures = {name for name in logger.record["artifacts"] if name.startswith("plasticity/")}
    assert {"plasticity/dead_frac.png", "plasticity/dormant_frac.png", "plasticity/effective_rank.png",
            "plasticity/resets.png", "plasticity/ages_steps.png"} <= figures
    assert not any(name.startswith("plasticity/covariates") for name in figures)
