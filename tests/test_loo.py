"""Leave-one-out plans: train_splits.py --plan_kind loo and its scores in eval_splits.py, on the real digits."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import eval_splits
import train_splits
from memorization.driver import make_plan, run_plan
from memorization.eval_driver import score_store
from memorization.loo import loo_memorization, score_loo_store
from memorization.plan import is_loo, loo_layout
from memorization.store import SubsetStore
from memorization.training import epoch_rows
from utils.errors import ConfigError

N_DIGITS_TRAIN = 1438


def loo_args(tmp_path, *extra: str, out: str = "store") -> argparse.Namespace:
    return train_splits.parse_args(["--plan_kind", "loo", "--n_epochs", "3", "--lr", "0.1", "--batch_size", "64",
                                    "--mlp_hidden", "64", "--out", str(tmp_path / out), "--tracking_uri",
                                    f"sqlite:///{tmp_path / 'mlflow.db'}", "--non_verbose", *extra])


def evaluate(tmp_path, *extra: str, out: str = "store"):
    return score_store(eval_splits.parse_args(["--run_dir", str(tmp_path / out), "--out",
                                               str(tmp_path / "scores" / f"{out}.npy"), "--tracking_uri",
                                               f"sqlite:///{tmp_path / 'mlflow.db'}", *extra]))


def test_a_loo_plan_has_per_seed_one_full_model_and_one_model_without_each_example(tmp_path):
    plan = make_plan(loo_args(tmp_path, "--loo_examples", "7,3,100-102", "--loo_seeds", "3", "--ensemble", "4"))
    examples = [3, 7, 100, 101, 102]
    assert is_loo(plan) and plan.settings["loo_examples"] == examples and plan.settings["loo_seeds"] == 3
    assert plan.inclusion_mask.shape == (3 * 6, N_DIGITS_TRAIN) and plan.n_models == 18
    for seed in range(3):
        block = plan.inclusion_mask[seed * 6:(seed + 1) * 6]
        assert block[0].all()  # the seed's full model
        for slot, example in enumerate(examples, start=1):
            assert np.flatnonzero(~block[slot]).tolist() == [example]
        assert len(set(plan.model_seed[seed * 6:(seed + 1) * 6].tolist())) == 1  # one seed per block
    assert len(set(plan.model_seed.tolist())) == 3
    positions, seeds = loo_layout(plan)
    assert plan.train_indices[positions].tolist() == examples and seeds == 3
    # The full models train together, apart from the leave-one-out ones (a group has one subset size).
    groups = plan.groups
    assert [0, 6, 12] in groups and all(len({int(plan.inclusion_mask[i].sum()) for i in g}) == 1 for g in groups)
    # random:N draws N of the plan's examples with --seed; another seed draws others.
    drawn = make_plan(loo_args(tmp_path, "--loo_examples", "random:40")).settings["loo_examples"]
    assert len(drawn) == 40 == len(set(drawn)) and drawn == sorted(drawn)
    assert drawn == make_plan(loo_args(tmp_path, "--loo_examples", "random:40")).settings["loo_examples"]
    assert drawn != make_plan(loo_args(tmp_path, "--loo_examples", "random:40", "--seed", "1")).settings["loo_examples"]
    # With --classes, indices stay dataset indices and the positions point into the plan's rows.
    restricted = make_plan(loo_args(tmp_path, "--loo_examples", "random:5", "--classes", "0,2"))
    positions, _ = loo_layout(restricted)
    assert restricted.train_indices[positions].tolist() == restricted.settings["loo_examples"]
    assert restricted.inclusion_mask.shape[1] == len(restricted.train_indices) < N_DIGITS_TRAIN


def test_a_model_without_one_example_sees_its_full_models_batch_order_without_it():
    n, left_out = 50, 17
    masks = torch.ones(2, n, dtype=torch.bool)
    masks[1, left_out] = False
    subset = torch.arange(n).expand(2, -1)
    generators = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)]
    for _ in range(3):  # several epochs: the generators stay in step
        rows = [epoch_rows(masks[k:k + 1], subset[k:k + 1], [generators[k]], paired=True)[0].tolist()
                for k in range(2)]
        full, without = rows
        assert sorted(full) == list(range(n)) and left_out not in without
        assert without == [r for r in full if r != left_out]


def test_loo_scores_are_the_mean_over_seeds_of_full_minus_left_out_probability(tmp_path):
    examples = "5,40,41,900"
    run_plan(loo_args(tmp_path, "--loo_examples", examples, "--loo_seeds", "2", "--ensemble", "4"))
    compare = np.random.default_rng(0).random(N_DIGITS_TRAIN).astype(np.float32)
    np.save(tmp_path / "compare.npy", compare)
    result = evaluate(tmp_path, "--compare", str(tmp_path / "compare.npy"), "--influence_topk", "3")
    store = SubsetStore(tmp_path / "store")
    plan = store.load_plan()
    models = [store.read_model(i, plan) for i in range(plan.n_models)]
    rows = [5, 40, 41, 900]
    by_hand = np.array([[models[s * 5]["prob_train"][-1][i].astype(np.float64)
                         - models[s * 5 + 1 + slot]["prob_train"][-1][i] for s in range(2)]
                        for slot, i in enumerate(rows)])
    scores = np.load(tmp_path / "scores" / "store.npy")
    assert scores.dtype == np.float32 and len(scores) == N_DIGITS_TRAIN
    assert np.isnan(np.delete(scores, rows)).all()
    np.testing.assert_allclose(scores[rows], by_hand.mean(1), atol=1e-6)
    se = np.load(tmp_path / "scores" / "store_se.npy")
    np.testing.assert_allclose(se[rows], by_hand.std(1, ddof=1) / np.sqrt(2), atol=1e-6)
    assert np.load(tmp_path / "scores" / "store_n_in.npy")[rows].tolist() == [2] * 4
    assert np.load(tmp_path / "scores" / "store_n_out.npy").sum() == 8
    # Influence on test example j: mean over seeds of full − without-i test probability; top-k over the 4 rows.
    test_diff = np.array([[models[s * 5]["prob_test"][-1].astype(np.float64) - models[s * 5 + 1 + slot]["prob_test"][-1]
                           for s in range(2)] for slot in range(4)]).mean(1)  # [4, m]
    with np.load(tmp_path / "scores" / "store_influence.npz") as infl:
        top, value = infl["topk_index"], infl["topk_value"]
        assert top.shape == (plan.settings["n_test"], 3)
        j = 11
        expected = np.argsort(-test_diff[:, j], kind="stable")[:3]
        assert top[j].tolist() == [rows[r] for r in expected]
        np.testing.assert_allclose(value[j], test_diff[expected, j], atol=1e-6)
        assert (infl["pair_value"] >= 0.15).all() and len(infl["pair_value"]) == (test_diff >= 0.15).sum()
    sidecar = json.loads((tmp_path / "scores" / "store.json").read_text())
    assert sidecar["estimator"] == "loo" and sidecar["loo_seeds"] == 2 and sidecar["n"] == N_DIGITS_TRAIN
    assert sidecar["n_undefined"] == N_DIGITS_TRAIN - 4 and sidecar["plan_hash"] == plan.hash
    summary = result["summary"]
    assert summary["spearman_with_compare_seeds_2"] == pytest.approx(
        spearmanr(by_hand.mean(1), compare[rows]).statistic, abs=1e-6)
    assert summary["spearman_with_compare_seeds_1"] == pytest.approx(
        spearmanr(by_hand[:, 0], compare[rows]).statistic, abs=1e-6)
    assert "spearman_split_half" in summary
    assert "| 2 |" in (tmp_path / "scores" / "store_report" / "report.md").read_text()


@pytest.mark.slow  # 22 MLPs × 30 epochs on every example
def test_relabeled_examples_have_high_leave_one_out_memorization(tmp_path):
    """With 10% of the labels flipped, removing a flipped example costs its full models far more of its
    (wrong) label's probability than removing a clean one."""
    noisy = np.flatnonzero(make_plan(loo_args(tmp_path, "--loo_examples", "0", "--label_noise", "0.1")).noisy_mask)
    clean = np.setdiff1d(np.arange(N_DIGITS_TRAIN), noisy)
    chosen = np.concatenate([noisy[:5], clean[:5]])
    np.save(tmp_path / "chosen.npy", chosen)
    run_plan(loo_args(tmp_path, "--loo_examples", str(tmp_path / "chosen.npy"), "--loo_seeds", "2", "--n_epochs",
                      "30", "--batch_size", "32", "--mlp_hidden", "256", "--label_noise", "0.1", "--ensemble", "16"))
    scores = evaluate(tmp_path)["scores"]
    assert np.mean(scores[noisy[:5]]) > 0.3 > 0.15 > np.mean(scores[clean[:5]])


@pytest.mark.slow  # four evaluations and a resume
def test_a_lost_loo_model_is_retrained_and_partial_stores_are_refused_or_scored_with_the_seeds_present(tmp_path):
    args = loo_args(tmp_path, "--loo_examples", "1,2", "--loo_seeds", "2")
    run_plan(args)
    store = SubsetStore(tmp_path / "store")
    lost = store.model_path(4)  # seed 1, without example 1
    original = lost.read_bytes()
    lost.unlink()
    with pytest.raises(ConfigError, match="holds 5 of the plan's 6 models"):
        evaluate(tmp_path)
    partial = evaluate(tmp_path, "--allow_partial")
    assert np.load(tmp_path / "scores" / "store_n_in.npy")[[1, 2]].tolist() == [1, 2]
    assert np.isnan(np.load(tmp_path / "scores" / "store_se.npy")[1])  # one seed: no standard error
    assert np.isfinite(partial["scores"][[1, 2]]).all()
    # Resumed: the lost model only (groups of one here), the same bytes (the launchers share this path,
    # tests/test_launchers.py).
    assert run_plan(args)["trained"] == 1
    assert lost.read_bytes() == original and evaluate(tmp_path)["summary"]["n_models"] == 6


def test_loo_memorization_counts_only_complete_seed_pairs():
    diff = np.array([[0.2, 0.4, np.nan], [np.nan, np.nan, np.nan], [0.1, 0.1, 0.1]])
    out = loo_memorization(diff)
    np.testing.assert_allclose(out["mem"], [0.3, np.nan, 0.1], atol=1e-7)
    assert out["count"].tolist() == [2, 0, 3] and np.isnan(out["se"][1]) and out["se"][2] == pytest.approx(0)


@pytest.mark.parametrize("argv, sentence", [
    (["--loo_examples", "1438"], "names example 1438, out of range: seq-digits's training set has examples 0..1437"),
    (["--loo_examples", "-3"], "is neither an index nor a range"),
    (["--loo_examples", "4,4"], "names example 4 twice"),
    (["--loo_examples", "random:5000"], "asks for 5000 examples but the plan has 1438"),
    (["--loo_examples", "random:x"], "takes a whole number"),
    (["--loo_examples", "3", "--classes", "5,7"], "leaves out of the plan"),
])
def test_bad_leave_one_out_examples_are_refused_in_one_sentence(tmp_path, argv, sentence):
    with pytest.raises(ConfigError, match=sentence.replace("(", r"\(").replace(")", r"\)")) as error:
        make_plan(loo_args(tmp_path, *argv))
    assert "\n" not in str(error.value)


def test_loo_flags_and_subset_flags_do_not_mix(tmp_path):
    for argv, sentence in ((["--plan_kind", "loo"], "needs --loo_examples"),
                           (["--plan_kind", "loo", "--loo_examples", "1", "--n_models", "4"], "--n_models sets subset"),
                           (["--plan_kind", "loo", "--loo_examples", "1", "--loo_seeds", "0"], "at least 1"),
                           (["--loo_seeds", "3"], "add --plan_kind loo")):
        with pytest.raises(ConfigError, match=sentence):
            train_splits.parse_args(["--lr", "0.1", "--out", str(tmp_path / "x"), *argv])
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    with pytest.raises(ConfigError, match="not a readable file of example indices"):
        make_plan(loo_args(tmp_path, "--loo_examples", str(tmp_path / "bad.npy")))
    np.save(tmp_path / "fractions.npy", np.array([0.5, 2.0]))
    with pytest.raises(ConfigError, match="whole-number example indices"):
        make_plan(loo_args(tmp_path, "--loo_examples", str(tmp_path / "fractions.npy")))


def test_a_loo_store_refuses_a_datamodel_and_keeps_its_plan_apart_from_a_subset_plan(tmp_path):
    args = loo_args(tmp_path, "--loo_examples", "1", "--loo_seeds", "1", "--n_epochs", "1")
    run_plan(args)
    store = SubsetStore(tmp_path / "store")
    namespace = eval_splits.parse_args(["--run_dir", str(tmp_path / "store"), "--out", str(tmp_path / "s.npy")])
    namespace.datamodels = True
    with pytest.raises(ConfigError, match="leave-one-out store, and a datamodel is fitted on random subsets"):
        score_loo_store(namespace, store, store.load_plan())
    subsets = train_splits.parse_args(["--n_models", "2", "--n_epochs", "1", "--lr", "0.1", "--mlp_hidden", "64",
                                       "--batch_size", "64", "--out", str(tmp_path / "store"), "--non_verbose"])
    with pytest.raises(ConfigError, match="already holds another subset-training plan"):
        run_plan(subsets)
