"""train_splits.py and eval_splits.py runs in MLflow: readable names, the dataset as an input, the printed way to
the run, and a score file whose sidecar names the evaluation run a later run links to."""
from __future__ import annotations

import hashlib
import json
import re
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import memorization.eval_driver
import train_splits
from memorization.driver import make_plan, split_run_name
from memorization.score_format import load_scores, record_score_run, save_scores, score_source_tags
from memorization.store import SubsetStore
from tests.test_score_pairs import N_TRAIN, digits
from tests.test_split_training import evaluate, train
from utils.errors import ConfigError


def runs_by_name(tmp_path) -> dict:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("split-training")
    return {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}


def dataset_inputs(run) -> list[tuple[str, str, str, str]]:
    return [(d.dataset.name, d.dataset.digest, d.dataset.source, {t.key: t.value for t in d.tags}["mlflow.data.context"])
            for d in run.inputs.dataset_inputs]


def printed_run(text: str, what: str) -> str:
    """The run id in the lines a program printed at its end, checked to come with the direct link to its page."""
    run_id = re.search(rf"^{what}: MLflow run (\w+) in sqlite:///", text, re.M).group(1)
    assert re.search(rf"open http://127\.0\.0\.1:\d+/#/experiments/\d+/runs/{run_id}$", text, re.M)
    assert "-m mlflow ui --backend-store-uri sqlite:///" in text
    return run_id


def test_split_training_and_its_evaluation_are_named_dated_and_point_at_their_runs(tmp_path, capsys, monkeypatch):
    train(tmp_path, "--n_models", "4", "--subset_ratio", "0.5")
    trained = capsys.readouterr().out
    saved = []

    def save_and_note_when(*pair):
        save_scores(*pair)
        saved.append(time.time())

    monkeypatch.setattr(memorization.eval_driver, "save_scores", save_and_note_when)
    before = time.time()
    evaluate(tmp_path)
    evaluated = capsys.readouterr().out
    runs = runs_by_name(tmp_path)
    assert set(runs) == {"splits-seq-digits-mlp-4x0.5-s0", "eval-store"}
    training, evaluation = runs["splits-seq-digits-mlp-4x0.5-s0"], runs["eval-store"]
    assert printed_run(trained, "split training") == training.info.run_id
    assert printed_run(evaluated, "memorization scores") == evaluation.info.run_id
    labels = SubsetStore(tmp_path / "store").load_plan().settings["label_fingerprint"]
    bundled = "scikit-learn's bundled digits"
    assert dataset_inputs(training) == [("seq-digits", labels, bundled, "training")]
    assert dataset_inputs(evaluation) == [("seq-digits", labels, bundled, "evaluation")]
    # The evaluation's run is opened once its scores exist, and dated from when the evaluation began.
    [scores_saved] = saved
    assert before * 1000 - 5 <= evaluation.info.start_time < scores_saved * 1000 <= evaluation.info.end_time
    # A rerun of a finished store opens no run and points at none.
    train(tmp_path, "--n_models", "4", "--subset_ratio", "0.5")
    assert "MLflow run" not in capsys.readouterr().out and len(runs_by_name(tmp_path)) == 2


def test_a_given_run_name_wins(tmp_path):
    train(tmp_path, "--n_models", "2", "--subset_ratio", "0.5", "--run_name", "my store")
    evaluate(tmp_path, "--run_name", "my scores")
    assert set(runs_by_name(tmp_path)) == {"my store", "my scores"}


def test_plans_are_named_after_their_kind_data_backbone_size_noise_and_seed():
    def name(*flags: str) -> str:
        return split_run_name(make_plan(train_splits.parse_args(["--out", "unused", "--lr", "0.1", *flags])).settings)

    assert name("--n_models", "16", "--subset_ratio", "0.5") == "splits-seq-digits-mlp-16x0.5-s0"
    assert name("--subset_ratio", "0.3,0.7", "--n_models", "8", "--label_noise", "0.1", "--seed", "3",
                "--classes", "0,4") == "splits-seq-digits-classes0-4-mlp-8x0.3+0.7-noise0.1-s3"
    assert name("--plan_kind", "loo", "--loo_examples", "0-9", "--loo_seeds", "2") == \
        "loo-seq-digits-mlp-10ex-2seeds-s0"


def test_the_score_sidecar_names_the_evaluation_run_and_a_run_using_the_file_gets_its_tags(tmp_path):
    train(tmp_path, "--n_models", "4", "--subset_ratio", "0.5")
    evaluate(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    evaluation = runs_by_name(tmp_path)["eval-store"]
    scores = tmp_path / "scores" / "store.npy"
    meta = json.loads(scores.with_suffix(".json").read_text())
    digest = hashlib.sha256(scores.read_bytes()).hexdigest()
    assert (meta["mlflow_run_id"], meta["mlflow_tracking_uri"], meta["scores_sha256"]) == \
        (evaluation.info.run_id, uri, digest)
    assert score_source_tags(str(scores)) == {"mem_scores_sha256": digest, "mem_scores_run_id": evaluation.info.run_id,
                                              "mem_scores_tracking_uri": uri}
    # The sidecar logged with the run is the one on disk, and the run can be found by the file's digest.
    client = MlflowClient(uri)
    logged = client.download_artifacts(evaluation.info.run_id, "store.json", str(tmp_path / "download"))
    assert json.loads(open(logged).read()) == meta
    assert evaluation.data.tags["scores_sha256"] == digest
    assert np.array_equal(load_scores(str(scores), digits()), np.load(scores), equal_nan=True)


def test_a_leave_one_out_evaluation_records_its_run_too(tmp_path):
    train(tmp_path, "--plan_kind", "loo", "--loo_examples", "0-2", "--loo_seeds", "1", out="loo")
    evaluate(tmp_path, out="loo")
    runs = runs_by_name(tmp_path)
    assert set(runs) == {"loo-seq-digits-mlp-3ex-1seeds-s0", "eval-loo"}
    scores = tmp_path / "scores" / "loo.npy"
    meta = json.loads(scores.with_suffix(".json").read_text())
    assert meta["estimator"] == "loo" and meta["mlflow_run_id"] == runs["eval-loo"].info.run_id
    assert score_source_tags(str(scores))["mem_scores_run_id"] == runs["eval-loo"].info.run_id


def test_older_sidecars_and_released_arrays_give_the_tags_they_can(tmp_path):
    scores = np.linspace(0, 1, N_TRAIN, dtype=np.float32)
    save_scores(tmp_path / "older.npy", scores, {"dataset": "seq-digits", "n": N_TRAIN})
    digest = hashlib.sha256((tmp_path / "older.npy").read_bytes()).hexdigest()
    assert score_source_tags(str(tmp_path / "older.npy")) == {"mem_scores_sha256": digest}
    assert np.array_equal(load_scores(str(tmp_path / "older.npy"), digits()), scores)
    np.save(tmp_path / "released.npy", scores)
    assert score_source_tags(str(tmp_path / "released.npy")) == {"mem_scores_sha256": digest}
    with pytest.raises(ConfigError, match="no such file"):
        score_source_tags(str(tmp_path / "missing.npy"))


def test_a_sidecar_of_other_scores_gives_no_tags_and_is_not_stamped(tmp_path):
    scores = np.linspace(0, 1, N_TRAIN, dtype=np.float32)
    save_scores(tmp_path / "a.npy", scores, {"dataset": "seq-digits", "n": N_TRAIN})
    sidecar = (tmp_path / "a.json").read_text()
    with pytest.raises(ConfigError, match="replaced by another evaluation"):  # the pair on disk is not these scores
        record_score_run(tmp_path / "a.npy", scores[::-1].copy(), "run", "sqlite:///x.db")
    assert (tmp_path / "a.json").read_text() == sidecar
    record_score_run(tmp_path / "a.npy", scores, "run", "sqlite:///x.db")
    assert score_source_tags(str(tmp_path / "a.npy"))["mem_scores_run_id"] == "run"
    np.save(tmp_path / "a.npy", scores[::-1].copy())  # other scores beside the sidecar
    with pytest.raises(ConfigError, match=r"does not match its sidecar a\.json"):
        score_source_tags(str(tmp_path / "a.npy"))
    assert not list(tmp_path.glob(".*tmp"))

