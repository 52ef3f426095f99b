"""Linear datamodels (eval_splits.py --datamodels): the LASSO recovers a planted sparse linear margin, the
margins are the hand-computed ones, and on a real digits store the file, summary and report agree with an
independent recomputation from the model files; the refusals are one sentence each."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import eval_splits
import train_splits
from memorization.datamodels import (
    MARGIN_RANGE,
    check_enough_models,
    fit_datamodels,
    margin_from_logits,
    margin_from_prob,
    models_needed,
)
from memorization.driver import run_plan
from memorization.eval_driver import score_store
from memorization.store import SubsetStore
from memorization.training import load_plan_data
from utils.errors import ConfigError

N_MODELS, TOPK = 24, 4


# -- (a) a planted sparse linear function ----------------------------------------------------------
@pytest.mark.parametrize("n_models, n, per_target", [(300, 40, 3), (80, 120, 2)])  # Gram path; n > models
def test_lasso_recovers_a_planted_sparse_linear_margin(n_models, n, per_target):
    rng = np.random.default_rng(0)
    m = 5
    mask = rng.random((n_models, n)) < 0.5
    theta = np.zeros((n, m))
    for j in range(m):
        support = rng.choice(n, per_target, replace=False)
        theta[support, j] = rng.choice([-1, 1], per_target) * rng.uniform(1, 2, per_target)
    bias = rng.normal(0, 2, m)
    margin = mask @ theta + bias + rng.normal(0, 0.02, (n_models, m))
    fitted = fit_datamodels(mask, margin, topk=TOPK, threads=1)
    dense = np.zeros((n, m))
    dense[fitted["train_index"], fitted["test_index"]] = fitted["value"]
    for j in range(m):
        true_support = np.flatnonzero(theta[:, j])
        assert set(true_support) <= set(np.flatnonzero(dense[:, j]))  # support found
        largest = np.argsort(-np.abs(dense[:, j]))[:per_target]
        assert set(largest) == set(true_support)  # and it holds the largest coefficients
    # values within 0.1 (LASSO shrinks them by about its alpha; noise 0.02), the rest near 0, the bias too
    np.testing.assert_allclose(dense[theta != 0], theta[theta != 0], atol=0.1)
    assert np.abs(dense[theta == 0]).max() < 0.05
    np.testing.assert_allclose(fitted["bias"], bias, atol=0.1)
    assert (fitted["val_r2"] > 0.99).all() and fitted["val_spearman"] > 0.99 and fitted["converged"].all()
    # top-k: the largest θ by value, ties to the lower index, -1/NaN beyond the nonzeros
    for j in range(m):
        nonzero = np.flatnonzero(dense[:, j])
        expected = nonzero[np.lexsort((nonzero, -dense[nonzero, j]))][:TOPK]
        np.testing.assert_array_equal(fitted["topk_index"][j, :len(expected)], expected)
        assert (fitted["topk_index"][j, len(expected):] == -1).all()
    # the validation models are the seeded tenth, apart from the fit models; threads change no bit
    assert len(fitted["val_models"]) == round(0.1 * n_models)
    assert not set(fitted["val_models"]) & set(fitted["fit_models"])
    again = fit_datamodels(mask, margin, topk=TOPK, threads=2)
    for key in ("train_index", "test_index", "value", "bias", "alpha", "val_models"):
        np.testing.assert_array_equal(again[key], fitted[key])


# -- (b) the margins ---------------------------------------------------------------------------------
def test_margin_from_logits_and_from_probabilities():
    logits = np.array([[2.0, 5.0, 1.0], [0.5, -1.0, 3.0], [4.0, 4.0, -2.0]], np.float16)
    labels = np.array([1, 0, 1])
    # label 1: 5 - max(2, 1) = 3; label 0: 0.5 - max(-1, 3) = -2.5; a tie with another class: 0
    np.testing.assert_array_equal(margin_from_logits(logits, labels), [3.0, -2.5, 0.0])
    per_model = margin_from_logits(np.stack([logits, -logits]), labels)  # [models, m, classes]
    # negated: -5 - max(-2, -1) = -4; -0.5 - max(1, -3) = -1.5; -4 - max(-4, 2) = -6
    np.testing.assert_array_equal(per_model, [[3.0, -2.5, 0.0], [-4.0, -1.5, -6.0]])
    prob = np.array([0.8, 0.5, 0.25, 0.0, 1.0, 0.9995], np.float16)
    p = float(prob[0])  # float16(0.8) = 0.7998...: log p/(1-p) of the stored value
    expected = [np.log(p / (1 - p)), 0.0, np.log(1 / 3), MARGIN_RANGE[0], MARGIN_RANGE[1], MARGIN_RANGE[1]]
    np.testing.assert_allclose(margin_from_prob(prob), expected, rtol=1e-6)
    # the range: the smallest positive float16 and the largest below 1, log p/(1-p) of each
    assert MARGIN_RANGE == pytest.approx((np.log(2.0**-24 / (1 - 2.0**-24)), np.log(2047)))
    assert np.float16(0.9995) == np.float16(1 - 2**-11)  # rounds to the largest float16 below 1


# -- (c) end to end on a real store --------------------------------------------------------------------
@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two digits stores (classes 0-2, so training rows are not dataset rows), one with logits."""
    folder = tmp_path_factory.mktemp("datamodels")
    for name, extra in (("logits", ["--save_logits"]), ("prob", [])):
        run_plan(train_splits.parse_args(["--dataset", "seq-digits", "--classes", "0,3", "--n_models", str(N_MODELS),
                                          "--ensemble", str(N_MODELS), "--subset_ratio", "0.5", "--n_epochs", "3",
                                          "--lr", "0.1", "--batch_size", "32", "--mlp_hidden", "32",
                                          "--out", str(folder / name), "--non_verbose",
                                          "--tracking_uri", f"sqlite:///{folder / 'train.db'}", *extra]))
    return folder


def evaluate(store, out, uri, *extra):
    return score_store(eval_splits.parse_args(["--run_dir", str(store), "--out", str(out), "--datamodels",
                                               "--influence_topk", str(TOPK), "--tracking_uri", uri, *extra]))


@pytest.mark.parametrize("kind", ["logits", pytest.param("prob", marks=pytest.mark.slow)])
def test_eval_splits_writes_the_datamodels_of_a_real_store(stores, tmp_path, kind):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = evaluate(stores / kind, tmp_path / "s.npy", uri)
    store = SubsetStore(stores / kind)
    plan = store.load_plan()
    rows, n, m = plan.train_indices, plan.inclusion_mask.shape[1], plan.settings["n_test"]
    assert n < plan.settings["n_train_total"] and (rows != np.arange(n)).any()
    with np.load(tmp_path / "s_datamodels.npz", allow_pickle=False) as saved:
        dm = {key: saved[key] for key in saved.files}
    assert str(dm["margin_kind"]) == kind
    assert dm["bias"].shape == dm["alpha"].shape == dm["val_r2"].shape == (m,) and np.isfinite(dm["bias"]).all()
    assert dm["topk_index"].shape == dm["topk_value"].shape == (m, TOPK)
    assert len(dm["test_index"]) == len(dm["train_index"]) == len(dm["value"]) > 0
    assert np.isin(dm["train_index"], rows).all() and np.isin(dm["topk_index"][dm["topk_index"] >= 0], rows).all()
    assert (dm["value"] != 0).all() and ((dm["topk_index"] >= 0) == np.isfinite(dm["topk_value"])).all()

    # the same fit from the model files: margins by hand, positions mapped to dataset rows
    labels = load_plan_data(plan, "./data", "cpu").test_labels.numpy()
    models = [store.read_model(k, plan) for k in range(plan.n_models)]
    if kind == "logits":
        z = np.stack([model["logits_test"][-1] for model in models]).astype(np.float32)  # [models, m, classes]
        correct = z[:, np.arange(m), labels]
        z[:, np.arange(m), labels] = -np.inf
        margin = correct - z.max(-1)
    else:
        p = np.clip(np.stack([model["prob_test"][-1] for model in models]).astype(np.float64), 2.0**-24, 1 - 2.0**-11)
        margin = np.log(p / (1 - p)).astype(np.float32)
    fitted = fit_datamodels(plan.inclusion_mask, margin, seed=plan.settings["seed"], topk=TOPK)
    np.testing.assert_array_equal(dm["train_index"], rows[fitted["train_index"]])
    np.testing.assert_allclose(dm["value"], fitted["value"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dm["bias"], fitted["bias"], rtol=1e-5, atol=1e-5)

    # Pearson with the held-out influence of the margin, by a loop, for a few test examples
    mask, position = plan.inclusion_mask, np.full(plan.settings["n_train_total"], -1)
    position[rows] = np.arange(n)
    for j in (0, m // 2, m - 1):
        infl = np.array([margin[mask[:, i], j].mean() - margin[~mask[:, i], j].mean() for i in range(n)])
        theta = np.zeros(n)
        theta[position[dm["train_index"][dm["test_index"] == j]]] = dm["value"][dm["test_index"] == j]
        expected = np.corrcoef(theta, infl)[0, 1] if theta.any() else np.nan
        np.testing.assert_allclose(dm["influence_pearson"][j], expected, rtol=1e-4, atol=1e-5)

    summary = result["summary"]
    assert summary["datamodel_fit_models"] + summary["datamodel_val_models"] == N_MODELS
    assert summary["datamodel_val_r2_mean"] == pytest.approx(np.nanmean(dm["val_r2"]))
    assert summary["datamodel_nonzeros_mean"] == pytest.approx(len(dm["value"]) / m)
    assert summary["datamodel_influence_pearson_median"] == pytest.approx(np.nanmedian(dm["influence_pearson"]))
    assert summary["datamodel_topk_overlap_mean"] == pytest.approx(dm["topk_overlap"].mean())
    assert -1 <= summary["datamodel_val_spearman"] <= 1 and 0 <= summary["datamodel_topk_overlap_mean"] <= 1
    sidecar = json.loads((tmp_path / "s.json").read_text())
    assert sidecar["files"]["datamodels"] == "s_datamodels.npz" and sidecar["datamodel_margin"] == kind
    markdown = (tmp_path / "s_report" / "summary.md").read_text()
    assert "## Datamodels" in markdown and f"fitted on {summary['datamodel_fit_models']} of the {N_MODELS}" in markdown
    assert (tmp_path / "s_report" / "datamodel_vs_influence.png").stat().st_size > 0
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("split-training").experiment_id])[0]
    assert "s_datamodels.npz" in {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert run.data.metrics["datamodel_val_r2_mean"] == pytest.approx(summary["datamodel_val_r2_mean"])
    assert run.data.params["datamodel_margin"] == kind
    if kind == "prob":  # evaluated again without --datamodels: the earlier fit does not stay beside the new scores
        score_store(eval_splits.parse_args(["--run_dir", str(stores / kind), "--out", str(tmp_path / "s.npy"),
                                            "--tracking_uri", uri]))
        assert not (tmp_path / "s_datamodels.npz").exists()
        assert "datamodels" not in json.loads((tmp_path / "s.json").read_text())["files"]


# -- (d) refusals -------------------------------------------------------------------------------------
def test_too_few_models_are_refused_before_any_file(stores, tmp_path):
    assert models_needed(0.1) == 10 and models_needed(0.5) == 16
    with pytest.raises(ConfigError, match="needs at least 10 models"):
        check_enough_models(9, 0.1)
    few = tmp_path / "few"
    shutil.copytree(stores / "prob", few)
    for path in sorted((few / "models").glob("model_*.npz"))[6:]:
        path.unlink()
    with pytest.raises(ConfigError, match=r"--datamodels needs at least 10 models .* the store holds 6; "):
        evaluate(few, tmp_path / "out" / "s.npy", f"sqlite:///{tmp_path / 'm.db'}", "--allow_partial")
    assert not (tmp_path / "out" / "s.npy").exists()


def test_released_runs_and_bad_flags_are_refused_in_one_sentence(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for seed in range(12):
        folder = tmp_path / "released" / "0.5" / str(seed)
        folder.mkdir(parents=True)
        included = np.sort(rng.choice(20, 10, replace=False))
        removed = np.setdiff1d(np.arange(20), included)
        np.savez(folder / "aux_arrays.npz", subsample_idx=included, index_train=included, index_removed=removed,
                 correctness_train=np.ones(10, bool), correctness_removed=rng.random(10) < 0.5,
                 index_test=np.arange(5), correctness_test=rng.random(5) < 0.5)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    for argv, sentence in (
            (["--run_dir", str(tmp_path / "released"), "--target", "correct", "--datamodels"],
             "released aux_arrays.npz runs hold 0/1 correctness only; leave out --datamodels"),
            (["--run_dir", ".", "--datamodels", "--datamodel_val_fraction", "0.8"],
             "--datamodel_val_fraction must be above 0 and at most 0.5"),
            (["--run_dir", ".", "--datamodels", "--datamodel_alphas", "1"], "--datamodel_alphas must be at least 2")):
        capsys.readouterr()
        assert eval_splits.main([*argv, "--out", str(tmp_path / "s.npy"), "--tracking_uri", uri]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and sentence in error and "\n" not in error and ". " not in error
    assert not (tmp_path / "s.npy").exists()
