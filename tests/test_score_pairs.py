"""A score file and its sidecar are one pair: validated before anything is written, bound by the score file's
digest, and refused when they do not belong together."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import eval_splits
import main
from continual.args import parse_args
from datasets import DATASETS
from memorization.score_format import load_scores, save_scores
from tests.test_split_training import evaluate, train
from utils.errors import ConfigError

N_TRAIN = 1438


def digits():
    return DATASETS.get("seq-digits")(parse_args(["--model", "sgd", "--lr", "0.1", "--dataset", "seq-digits",
                                                  "--seed", "0"]))


def test_a_mistyped_compare_path_leaves_the_previous_pair_untouched(tmp_path, capsys):
    train(tmp_path, "--n_models", "4")
    evaluate(tmp_path)
    scores, sidecar = tmp_path / "scores" / "store.npy", tmp_path / "scores" / "store.json"
    before = {path: path.read_bytes() for path in (tmp_path / "scores").iterdir() if path.is_file()}
    code = eval_splits.main(["--run_dir", str(tmp_path / "store"), "--out", str(scores), "--compare",
                             str(tmp_path / "no_such_scores.npy"), "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert code == 2 and "--compare" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in (tmp_path / "scores").iterdir() if path.is_file()} == before
    meta = json.loads(sidecar.read_text())
    assert meta["scores_sha256"] == hashlib.sha256(scores.read_bytes()).hexdigest()
    assert np.array_equal(load_scores(str(scores), digits()), np.load(scores), equal_nan=True)
    assert not list((tmp_path / "scores").glob(".*tmp"))  # no temporary file left behind


def test_scores_beside_another_evaluations_sidecar_are_refused(tmp_path, capsys):
    first = np.linspace(0, 1, N_TRAIN, dtype=np.float32)
    save_scores(tmp_path / "a.npy", first, {"dataset": "seq-digits", "n": N_TRAIN})
    np.save(tmp_path / "a.npy", first[::-1].copy())  # new scores, the old sidecar: a kill between the two files
    with pytest.raises(ConfigError, match=r"does not match its sidecar a\.json.*run eval_splits\.py again"):
        load_scores(str(tmp_path / "a.npy"), digits())
    code = main.main(["--model", "maer", "--buffer_policy", "max", "--buffer_size", "40", "--lr", "0.1",
                      "--mem_scores", str(tmp_path / "a.npy"), "--mem_proxy", "none", "--n_epochs", "1",
                      "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}", "--non_verbose"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "does not match its sidecar" in err and "\n" not in err


def test_scores_without_a_finite_value_are_refused(tmp_path):
    np.save(tmp_path / "nan.npy", np.full(N_TRAIN, np.nan, dtype=np.float32))
    with pytest.raises(ConfigError, match="holds no finite score"):
        load_scores(str(tmp_path / "nan.npy"), digits())


def test_main_py_forgetting_events_come_with_a_sidecar_bound_to_them(tmp_path):
    from continual.run import run
    from utils.mlflow_logger import RecordingLogger

    logger = RecordingLogger(run_id="x")
    run(parse_args(["--model", "er", "--buffer_size", "40", "--lr", "0.1", "--n_epochs", "1", "--seed", "0",
                    "--forgetting_events", "--non_verbose", "--no_figures", "--device", "cpu"]), logger=logger)
    artifacts = logger.record["artifacts"]
    meta = json.loads(artifacts["forgetting/events.json"])
    assert meta["scores_sha256"] == hashlib.sha256(artifacts["forgetting/events.npy"]).hexdigest()
    (tmp_path / "events.npy").write_bytes(artifacts["forgetting/events.npy"])
    (tmp_path / "events.json").write_bytes(artifacts["forgetting/events.json"])
    assert np.isfinite(load_scores(str(tmp_path / "events.npy"), digits())).any()
