"""eval_splits.py --lds_holdout / --lds_store / --loo_store: the influence matrix scored on held-out models and
against measured leave-one-out effects, recomputed here from the model files."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

import eval_splits
import train_splits
from memorization.driver import run_plan
from memorization.store import SubsetStore
from utils.errors import ConfigError

COMMON = ["--dataset", "seq-digits", "--n_epochs", "3", "--lr", "0.1", "--batch_size", "32", "--non_verbose"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("attribution")
    tracking = f"sqlite:///{folder / 'mlflow.db'}"
    run_plan(train_splits.parse_args([*COMMON, "--n_models", "12", "--subset_ratio", "0.5", "--out",
                                      str(folder / "subsets"), "--tracking_uri", tracking]))
    run_plan(train_splits.parse_args([*COMMON, "--plan_kind", "loo", "--loo_examples", "random:4", "--loo_seeds",
                                      "1", "--out", str(folder / "loo"), "--tracking_uri", tracking]))
    return folder, tracking


def final_targets(folder):
    store = SubsetStore(folder)
    plan = store.load_plan()
    models = [store.read_model(k, plan) for k in range(plan.n_models)]
    return plan, np.stack([m["prob_test"][-1].astype(np.float32) for m in models]), models


def influence_matrix(mask, test):
    return np.stack([test[mask[:, i]].mean(0) - test[~mask[:, i]].mean(0) for i in range(mask.shape[1])])


def test_lds_on_held_out_models_and_the_loo_correlation_are_their_definitions(stores):
    folder, tracking = stores
    out = folder / "mem.npy"
    eval_splits.main(["--run_dir", str(folder / "subsets"), "--out", str(out), "--lds_holdout", "0.25",
                      "--loo_store", str(folder / "loo"), "--tracking_uri", tracking])
    plan, test, _ = final_targets(folder / "subsets")
    fit, held = slice(0, 9), slice(9, 12)
    influence = influence_matrix(plan.inclusion_mask[fit], test[fit])
    predicted = plan.inclusion_mask[held].astype(np.float64) @ influence
    per_test = [spearmanr(predicted[:, j], test[held][:, j]).statistic for j in range(test.shape[1])]
    summary = json.loads((folder / "mem.json").read_text())
    assert summary["n_models"] == 9  # the held-out models are in no score
    report = (folder / "mem_report" / "summary.csv").read_text()
    values = dict(line.split(",", 1) for line in report.splitlines()[1:])
    assert float(values["lds_models"]) == 3
    assert float(values["lds_influence"]) == pytest.approx(np.nanmean(per_test), abs=1e-4)
    assert not (folder / "mem_influence_full.npy").exists()  # written for the score only
    # leave-one-out: each left-out example's influence row against full − without-it on the test set
    loo_plan, loo_test, _ = final_targets(folder / "loo")
    rows = np.searchsorted(plan.train_indices, loo_plan.train_indices[np.asarray(loo_plan.settings["loo_examples"])])
    effect = loo_test[0][None] - loo_test[1:]
    both = np.isfinite(effect.ravel()) & np.isfinite(influence[rows].ravel())
    assert float(values["loo_pearson_influence"]) == pytest.approx(
        pearsonr(influence[rows].ravel()[both], effect.ravel()[both]).statistic, abs=1e-4)
    assert float(values["loo_examples"]) == 4


def test_held_out_models_from_a_second_store_and_the_refusals(stores, tmp_path):
    folder, tracking = stores
    with pytest.raises(ConfigError, match="not both"):
        eval_splits.parse_args(["--run_dir", "x", "--out", "y.npy", "--lds_holdout", "0.2", "--lds_store", "z"])
    with pytest.raises(ConfigError, match="leaves 1 held out"):
        eval_splits.score_store(eval_splits.parse_args(["--run_dir", str(folder / "subsets"), "--out",
                                                        str(tmp_path / "m.npy"), "--lds_holdout", "0.1",
                                                        "--tracking_uri", tracking]))
    with pytest.raises(ConfigError, match="is a loo store"):
        eval_splits.score_store(eval_splits.parse_args(["--run_dir", str(folder / "subsets"), "--out",
                                                        str(tmp_path / "m.npy"), "--lds_store", str(folder / "loo"),
                                                        "--tracking_uri", tracking]))
    with pytest.raises(ConfigError, match="not a leave-one-out store"):
        eval_splits.score_store(eval_splits.parse_args(["--run_dir", str(folder / "subsets"), "--out",
                                                        str(tmp_path / "m.npy"), "--loo_store",
                                                        str(folder / "subsets"), "--tracking_uri", tracking]))
    # the same store as its own held-out store: every held-out model was also fitted, so the score is high
    result = eval_splits.score_store(eval_splits.parse_args([
        "--run_dir", str(folder / "subsets"), "--out", str(tmp_path / "m.npy"), "--lds_store",
        str(folder / "subsets"), "--tracking_uri", tracking]))
    assert result["summary"]["lds_models"] == 12 and result["summary"]["lds_influence"] > 0.2


def test_subset_only_flags_on_a_leave_one_out_store_are_refused(stores, tmp_path):
    folder, tracking = stores
    for flag in (["--proxies"], ["--lds_holdout", "0.3"], ["--influence_full"]):
        with pytest.raises(ConfigError, match=f"{flag[0]} scores subset stores, and a leave-one-out store"):
            eval_splits.score_store(eval_splits.parse_args(["--run_dir", str(folder / "loo"), "--out",
                                                            str(tmp_path / "m.npy"), *flag, "--tracking_uri",
                                                            tracking]))


def test_a_loo_store_of_other_data_is_refused_before_any_file_is_written(stores, tmp_path):
    folder, tracking = stores
    other = tmp_path / "other_loo"
    run_plan(train_splits.parse_args([*COMMON, "--n_epochs", "1", "--label_noise", "0.1", "--plan_kind", "loo",
                                      "--loo_examples", "random:1", "--loo_seeds", "1", "--out", str(other),
                                      "--tracking_uri", tracking]))
    with pytest.raises(ConfigError, match="holds models of other data"):
        eval_splits.score_store(eval_splits.parse_args(["--run_dir", str(folder / "subsets"), "--out",
                                                        str(tmp_path / "out" / "m.npy"), "--loo_store", str(other),
                                                        "--tracking_uri", tracking]))
    assert not (tmp_path / "out").exists()
