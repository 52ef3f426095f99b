"""train_splits.py and eval_splits.py end to end on the real digits data."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import eval_splits
from memorization.driver import run_plan
from memorization.eval_driver import score_store
import train_splits
from tests.conftest import REPO_ROOT
from memorization.plan import balanced_masks
from memorization.store import SubsetStore


def train(tmp_path, *extra: str, out: str = "store"):
    width = [] if "--backbone" in extra else ["--mlp_hidden", "64"]
    argv = ["--dataset", "seq-digits", "--n_epochs", "3", "--lr", "0.1", "--batch_size", "64", *width,
            "--out", str(tmp_path / out), "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--non_verbose",
            *extra]
    return run_plan(train_splits.parse_args(argv))


def evaluate(tmp_path, *extra: str, out: str = "store"):
    argv = ["--run_dir", str(tmp_path / out), "--out", str(tmp_path / "scores" / f"{out}.npy"),
            "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *extra]
    return score_store(eval_splits.parse_args(argv))


@pytest.mark.slow  # 16 MLPs × 100 epochs
def test_relabeled_digits_rank_at_the_top_of_the_memorization_scores(tmp_path):
    """16 MLPs fit their halves of seq-digits with 10% of labels flipped; the flipped ones stand out."""
    train(tmp_path, "--n_models", "16", "--subset_ratio", "0.5", "--n_epochs", "100", "--batch_size", "32",
          "--mlp_hidden", "256", "--label_noise", "0.1", "--ensemble", "16")
    result = evaluate(tmp_path)
    scores = np.load(tmp_path / "scores" / "store.npy", allow_pickle=False)
    noisy = np.load(tmp_path / "store" / "noisy_mask.npy", allow_pickle=False)
    assert scores.dtype == np.float32 and len(scores) == len(noisy) == 1438
    assert noisy.sum() == round(0.1 * 1438)
    assert result["summary"]["auroc_relabeled"] >= 0.9
    # The relabeled examples are memorized (fitted only when included): mean score far above the clean ones.
    assert np.nanmean(scores[noisy]) > 0.6 > 0.2 > np.nanmean(scores[~noisy])
    sidecar = json.loads((tmp_path / "scores" / "store.json").read_text())
    assert sidecar["dataset"] == "seq-digits" and sidecar["n"] == 1438 and sidecar["n_models"] == 16
    assert sidecar["target"] == "prob" and sidecar["n_undefined"] == 0
    n_in = np.load(tmp_path / "scores" / "store_n_in.npy")
    assert set(n_in.tolist()) == {8}  # balanced: every example in exactly half of the 16 subsets
    # Both scripts logged to MLflow: the training run with its plan, the evaluation with its report.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("split-training").experiment_id])
    assert len(runs) == 2
    evaluation = next(r for r in runs if "auroc_relabeled" in r.data.metrics)
    assert evaluation.data.metrics["auroc_relabeled"] == pytest.approx(result["summary"]["auroc_relabeled"])
    report = {a.path for a in client.list_artifacts(evaluation.info.run_id, "report")}
    assert "report/most_memorized.png" in report and "report/summary.md" in report
    training = next(r for r in runs if r is not evaluation)
    assert training.data.params["plan_hash"] == SubsetStore(tmp_path / "store").load_plan().hash
    assert training.data.metrics["models_stored"] == 16


def test_balanced_masks_include_every_example_equally_often():
    rng = np.random.default_rng(0)
    masks = balanced_masks(101, 0.3, 17, rng)
    assert (masks.sum(1) == 30).all()
    counts = masks.sum(0)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 17 * 30


def test_an_ensemble_trains_the_same_models_as_one_at_a_time(tmp_path):
    train(tmp_path, "--n_models", "4", "--ensemble", "1", out="single")
    train(tmp_path, "--n_models", "4", "--ensemble", "4", out="ensemble")
    for model_id in range(4):
        single = np.load(tmp_path / "single" / "models" / f"model_{model_id:06d}.npz")
        ensemble = np.load(tmp_path / "ensemble" / "models" / f"model_{model_id:06d}.npz")
        np.testing.assert_allclose(single["prob_train"].astype(np.float32), ensemble["prob_train"].astype(np.float32),
                                   atol=2e-3)
        assert (single["correct_test"] == ensemble["correct_test"]).mean() > 0.99
    # Different seeds give different models.
    first = np.load(tmp_path / "single" / "models" / "model_000000.npz")["prob_test"]
    second = np.load(tmp_path / "single" / "models" / "model_000001.npz")["prob_test"]
    assert not np.array_equal(first, second)


def test_rerunning_trains_only_missing_models_and_partial_stores_are_refused(tmp_path, capsys):
    assert train(tmp_path, "--n_models", "6", "--chunk", "1/3")["trained"] == 2
    assert SubsetStore(tmp_path / "store").stored_models() == {2, 3}
    with pytest.raises(Exception, match="holds 2 of the plan's 6 models; .* --allow_partial"):
        evaluate(tmp_path)
    partial = evaluate(tmp_path, "--allow_partial")
    assert partial["summary"]["n_models"] == 2
    assert partial["summary"]["n_undefined"] > 0  # with two models many examples were never left out
    assert np.isnan(partial["memorization"]["mem"]).sum() == partial["summary"]["n_undefined"]
    assert train(tmp_path, "--n_models", "6")["trained"] == 4
    assert train(tmp_path, "--n_models", "6")["trained"] == 0


def test_a_different_plan_is_refused_and_the_store_is_untouched(tmp_path):
    train(tmp_path, "--n_models", "2")
    before = sorted(p.name for p in (tmp_path / "store" / "models").iterdir())
    with pytest.raises(Exception, match="already holds another subset-training plan .*lr.*pass a new --out"):
        train(tmp_path, "--n_models", "2", "--lr", "0.05")
    assert sorted(p.name for p in (tmp_path / "store" / "models").iterdir()) == before


def test_a_corrupt_model_file_is_set_aside_and_retrained(tmp_path, capsys):
    train(tmp_path, "--n_models", "3")
    path = tmp_path / "store" / "models" / "model_000001.npz"
    good = np.load(path)["prob_test"]
    path.write_bytes(path.read_bytes()[:300])  # truncated, as by a full disk
    with pytest.raises(Exception, match="holds 2 of the plan's 3 models"):
        evaluate(tmp_path)
    assert train(tmp_path, "--n_models", "3")["trained"] == 1
    assert "model_000001.npz cannot be read" in capsys.readouterr().err
    assert list((tmp_path / "store" / "models").glob("model_000001.corrupt-*"))  # kept, not deleted
    np.testing.assert_array_equal(np.load(path)["prob_test"], good)  # the retrained model is the same model


@pytest.mark.slow
def test_a_killed_run_resumes_without_retraining_finished_models(tmp_path):
    command = [sys.executable, "train_splits.py", "--n_models", "16", "--n_epochs", "10", "--lr", "0.1",
               "--batch_size", "32", "--out", str(tmp_path / "store"), "--non_verbose",
               "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    models = tmp_path / "store" / "models"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(models.glob("model_*.npz"))) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stored = SubsetStore(tmp_path / "store").stored_models()
    assert 3 <= len(stored) < 16, "the run was not killed midway"
    times = {i: (models / f"model_{i:06d}.npz").stat().st_mtime_ns for i in stored}
    result = run_plan(train_splits.parse_args(command[2:]))
    assert result["trained"] == 16 - len(stored)
    assert all((models / f"model_{i:06d}.npz").stat().st_mtime_ns == t for i, t in times.items())
    assert not list(models.glob(".*tmp"))  # the killed write left no partial file behind


def test_epochs_recorded_and_noise_kept_in_the_store(tmp_path):
    train(tmp_path, "--n_models", "4", "--n_epochs", "4", "--record_epochs", "1,2", "--input_noise", "0.05",
          "--label_noise", "0.05")
    plan = SubsetStore(tmp_path / "store").load_plan()
    assert plan.settings["training"]["record_epochs"] == [1, 2, 4]
    assert plan.input_noise_mask.sum() == round(0.05 * 1438) and plan.noisy_mask.sum() == round(0.05 * 1438)
    model = np.load(tmp_path / "store" / "models" / "model_000000.npz")
    assert model["prob_train"].shape == (3, 1438) and model["correct_test"].shape == (3, 359)
    assert model["prob_train"].dtype == np.float16 and model["correct_train"].dtype == bool
    # Training accuracy on the model's own subset rises over the recorded epochs.
    mask = plan.inclusion_mask[0]
    accuracy = model["correct_train"][:, mask].mean(1)
    assert accuracy[0] < accuracy[-1]
    evaluate(tmp_path, "--allow_partial")
    report = tmp_path / "scores" / "store_report"
    assert (report / "mem_per_epoch.png").exists() and (report / "per_epoch.csv").exists()


def test_several_ratios_give_consistency_scores(tmp_path):
    train(tmp_path, "--n_models", "4", "--subset_ratio", "0.3,0.7")
    plan = SubsetStore(tmp_path / "store").load_plan()
    assert plan.n_models == 8 and sorted(set(plan.model_ratio.tolist())) == [0.3, 0.7]
    assert set(plan.inclusion_mask[:4].sum(1).tolist()) == {round(0.3 * 1438)}
    evaluate(tmp_path)
    cscore = np.load(tmp_path / "scores" / "store_cscore.npy")
    assert cscore.shape == (1438,) and np.nanmin(cscore) >= 0 and np.nanmax(cscore) <= 1
    assert np.isfinite(cscore).mean() > 0.9


@pytest.mark.parametrize("argv, sentence", [
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--backbone", "nope"], "unknown backbone 'nope'"),
    (["--subset_ratio", "1.2"], "--subset_ratio must lie strictly between 0 and 1, got 1.2"),
    (["--subset_ratio", "0"], "--subset_ratio must lie strictly between 0 and 1, got 0.0"),
    (["--chunk", "5/5"], "--chunk 5/5 is out of range"),
    (["--chunk", "x"], "--chunk must be 'I/N'"),
    (["--record_epochs", "99"], "--record_epochs must lie in 1..3"),
    (["--classes", "8,12"], "--classes 8,12 exceeds seq-digits's 10 classes"),
])
def test_bad_split_training_input_ends_with_one_sentence(tmp_path, capsys, argv, sentence):
    code = train_splits.main(["--lr", "0.1", "--n_epochs", "3", "--out", str(tmp_path / "s"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and sentence in err and "\n" not in err


def test_bad_evaluation_input_ends_with_one_sentence(tmp_path, capsys):
    train(tmp_path, "--n_models", "2")
    np.save(tmp_path / "short.npy", np.zeros(100, dtype=np.float32))
    code = eval_splits.main(["--run_dir", str(tmp_path / "store"), "--out", str(tmp_path / "m.npy"),
                             "--compare", str(tmp_path / "short.npy"), "--tracking_uri",
                             f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == 2 and "holds (100,) scores but this dataset has 1438 training examples" in err
    code = eval_splits.main(["--run_dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.npy")])
    assert code == 2 and "holds neither a train_splits.py store" in capsys.readouterr().err


def test_released_aux_arrays_give_the_same_scores_as_our_store(tmp_path):
    """The per-run aux_arrays.npz layout of the released checkpoints is read into the same estimator."""
    train(tmp_path, "--n_models", "6", "--subset_ratio", "0.5")
    store = SubsetStore(tmp_path / "store")
    plan = store.load_plan()
    for model_id in range(plan.n_models):
        correct = np.load(store.model_path(model_id))["correct_train"][-1]
        test = np.load(store.model_path(model_id))["correct_test"][-1]
        included = np.flatnonzero(plan.inclusion_mask[model_id])
        removed = np.flatnonzero(~plan.inclusion_mask[model_id])
        folder = tmp_path / "released" / "0.5" / str(100 + model_id)
        folder.mkdir(parents=True)
        np.savez(folder / "aux_arrays.npz", subsample_idx=included, index_train=included,
                 correctness_train=correct[included], index_removed=removed, correctness_removed=correct[removed],
                 index_test=np.arange(len(test)), correctness_test=test)
    ours = evaluate(tmp_path, "--target", "correct")
    released = evaluate(tmp_path, "--target", "correct", out="released")
    np.testing.assert_array_equal(ours["memorization"]["mem"], released["memorization"]["mem"])
    np.testing.assert_array_equal(ours["influence"]["topk_value"], released["influence"]["topk_value"])
    with pytest.raises(Exception, match="hold 0/1 correctness only; pass --target correct"):
        evaluate(tmp_path, out="released")


def test_a_class_range_scores_only_its_examples_in_dataset_order(tmp_path):
    train(tmp_path, "--n_models", "4", "--classes", "2,4")
    plan = SubsetStore(tmp_path / "store").load_plan()
    labels = np.load(tmp_path / "store" / "plan_arrays.npz")["train_indices"]
    assert plan.settings["n_train"] == len(labels) < 1438
    evaluate(tmp_path)
    scores = np.load(tmp_path / "scores" / "store.npy")
    assert len(scores) == 1438  # dataset order over the whole training set ...
    assert np.isfinite(scores).sum() == len(labels)  # ... defined only for the planned classes
    assert np.isfinite(scores[plan.train_indices]).all()
