"""Stream plans (train_splits.py --plan_kind stream): learners that run a continual method on per-task balanced
subsets, their predictions after every task, and memorization per task boundary (eval_splits.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import eval_splits
import train_splits
from continual.stream_plan import make_stream_plan
from memorization.store import SubsetStore
from memorization.stream_eval import forgetting_by_memorization, task_means
from tests.test_work_sharing import claim_file
from utils.errors import ConfigError

STREAM = ["--plan_kind", "stream", "--n_models", "6", "--subset_ratio", "0.5", "--cl_model", "er",
          "--buffer_size", "40", "--dataset", "seq-digits", "--lr", "0.1", "--n_epochs", "2", "--non_verbose"]


def held_out_difference(mask: np.ndarray, target: np.ndarray) -> np.ndarray:
    """mean target of the models with each example − of the models without it, written out directly."""
    return np.array([target[mask[:, i], i].mean() - target[~mask[:, i], i].mean() for i in range(mask.shape[1])])


def read_store(folder):
    store = SubsetStore(folder)
    plan = store.load_plan()
    models = [store.read_model(k, plan) for k in range(plan.n_models)]
    return plan, models


def test_per_task_boundary_memorization_is_the_held_out_difference_over_the_tasks_seen(tmp_path, tracking_uri):
    out = tmp_path / "store"
    train_splits.run_plan(train_splits.parse_args([*STREAM, "--n_tasks", "2", "--out", str(out), "--tracking_uri", tracking_uri]))
    plan, models = read_store(out)
    mask = plan.inclusion_mask
    eval_splits.main(["--run_dir", str(out), "--out", str(tmp_path / "mem.npy"), "--proxies", "--proxy_boot", "20",
                      "--tracking_uri", tracking_uri])
    tasks_mem = np.load(tmp_path / "mem_tasks.npy")
    own = np.load(tmp_path / "mem_own_task.npy")
    prob = np.stack([m["prob_train"].astype(np.float32) for m in models], 1)  # [T, K, n]
    seen_first = np.isfinite(prob[0]).all(0)  # task 1's examples: their classes are seen after task 1
    assert tasks_mem.shape == (2, mask.shape[1])
    np.testing.assert_allclose(tasks_mem[0, seen_first], held_out_difference(mask[:, seen_first],
                                                                             prob[0][:, seen_first]), atol=1e-6)
    assert np.isnan(tasks_mem[0, ~seen_first]).all()  # task 2's examples: undefined after task 1
    np.testing.assert_allclose(tasks_mem[1], held_out_difference(mask, prob[1]), atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "mem.npy"), tasks_mem[1])  # the score file: the stream's end
    np.testing.assert_allclose(own, np.where(seen_first, tasks_mem[0], tasks_mem[1]))
    # the proxies of one continual run (learner 0) against the in-stream estimator of learners 1..5
    proxies = np.load(tmp_path / "mem_proxies.npz")
    np.testing.assert_allclose(proxies["reference"], held_out_difference(mask[1:], prob[1][1:]), atol=1e-6)
    first, inside = models[0], mask[0]
    events = np.where(first["never_learned_train"], first["forget_events_train"][inside & ~first["never_learned_train"]]
                      .max(initial=0) + 1, first["forget_events_train"])
    np.testing.assert_array_equal(proxies["forgetting_events"][inside], events[inside])
    assert np.isnan(proxies["forgetting_events"][~inside]).all()
    loss = -np.log(np.clip(prob[:, 0], 1e-7, 1))  # [T, n]: learner 0's label cross-entropy at each boundary
    expected = np.where(seen_first, loss.sum(0), loss[1])  # task 2's examples from boundary 2 only
    np.testing.assert_allclose(proxies["cumulative_loss"][inside], expected[inside], rtol=1e-5)
    assert "## Memorization proxies of one continual run" in (tmp_path / "mem_report" / "report.md").read_text()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("split-training").experiment_id],
                             "attributes.run_name = 'eval-store'")[0]
    history = client.get_metric_history(run.info.run_id, "stream/mem_mean")
    assert [m.step for m in history] == [1, 2]  # one point per task boundary
    np.testing.assert_allclose([m.value for m in history], np.nanmean(tasks_mem, 1), rtol=1e-6)
    # Each learner's record is its continual run: class-IL test accuracy of task 1 after task 2 from its stored
    # predictions equals its accuracy matrix, and every task's examples are split evenly between the learners.
    test_first = np.isfinite(models[0]["prob_test"][0].astype(np.float32))
    for model in models:
        assert model["accuracy"][1, 0] == pytest.approx(100 * model["correct_test"][1, test_first].mean())
    for part in (seen_first, ~seen_first):
        assert set(mask[:, part].sum(1)) == {round(0.5 * part.sum())}  # half of each task per learner
        assert mask[:, part].sum(0).max() - mask[:, part].sum(0).min() <= 1  # balanced inclusion


def test_one_task_stream_equals_the_stationary_estimator(tmp_path, tracking_uri):
    out = tmp_path / "store"
    train_splits.run_plan(train_splits.parse_args([*STREAM, "--cl_model", "sgd", "--n_tasks", "1", "--out", str(out),
                                      "--tracking_uri", tracking_uri]))
    plan, models = read_store(out)
    eval_splits.main(["--run_dir", str(out), "--out", str(tmp_path / "mem.npy"), "--tracking_uri", tracking_uri])
    from memorization.estimator import memorization

    prob = np.stack([m["prob_train"][-1].astype(np.float32) for m in models])
    stationary = memorization(plan.inclusion_mask, prob)
    np.testing.assert_array_equal(np.load(tmp_path / "mem_tasks.npy")[0], stationary["mem"])
    # the standard error's sums of squares may be added in another order on a column copy: float32 rounding
    np.testing.assert_allclose(np.load(tmp_path / "mem_se.npy"), stationary["se"], rtol=1e-4)
    sidecar = json.loads((tmp_path / "mem.json").read_text())
    assert sidecar["estimator"] == "stream" and sidecar["n_models"] == 6
    # --compare works as for subset stores; flags a stream store has no data for are refused, not ignored
    again = eval_splits.score_store(eval_splits.parse_args(["--run_dir", str(out), "--out", str(tmp_path / "b.npy"),
                                                            "--compare", str(tmp_path / "mem.npy"),
                                                            "--tracking_uri", tracking_uri]))
    assert again["summary"]["spearman_with_compare"] == pytest.approx(1.0)
    for flag in (["--datamodels"], ["--influence_full"], ["--lds_holdout", "0.3"]):
        with pytest.raises(ConfigError, match=f"{flag[0]} scores subset stores"):
            eval_splits.score_store(eval_splits.parse_args(["--run_dir", str(out), "--out", str(tmp_path / "c.npy"),
                                                            *flag, "--tracking_uri", tracking_uri]))


def test_a_stream_store_resumes_to_the_same_bits_and_shares_groups_through_claims(tmp_path, tracking_uri):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    argv = [*STREAM, "--n_tasks", "2", "--tracking_uri", tracking_uri]
    train_splits.run_plan(train_splits.parse_args([*argv, "--out", str(whole)]))
    # A driver that trains the first half (a kill after it), then another whose group 4 another live driver holds.
    train_splits.run_plan(train_splits.parse_args([*argv, "--out", str(parts), "--chunk", "0/2"]))
    assert SubsetStore(parts).stored_models() == {0, 1, 2}
    live = claim_file(parts, 4, make_stream_plan(train_splits.parse_args([*argv, "--out", str(parts)])).hash, age=0)
    result = train_splits.run_plan(train_splits.parse_args([*argv, "--out", str(parts), "--claim_timeout", "60"]))
    assert result["trained"] == 2 and result["elsewhere"] == 1
    live.unlink()  # that driver stops; the next run takes the rest
    assert train_splits.run_plan(train_splits.parse_args([*argv, "--out", str(parts)]))["trained"] == 1
    for k in range(6):
        a, b = (np.load(SubsetStore(f).model_path(k)) for f in (whole, parts))
        for key in ("prob_train", "correct_train", "prob_test", "correct_test", "accuracy"):
            np.testing.assert_array_equal(a[key], b[key])


def test_forgetting_by_memorization_by_hand():
    # 4 learners, 3 examples of task 1 (index 0) and 1 of task 2, 2 tasks.
    mask = np.array([[1, 1, 0, 1], [1, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]], bool)
    correct = np.zeros((2, 4, 4), bool)
    correct[0, :2, 0] = True  # example 0: both learners with it right after task 1, ...
    correct[1, 0, 0] = True  # ... one of them after task 2: forgetting 1 − 0.5
    correct[0, [0, 2], 1] = True  # example 1: right, then forgotten by both: forgetting 1
    correct[:, 1, 2] = True  # example 2: learner 1 (with it) and learner 2 (with it): 0.5 both times: 0
    tasks = np.array([0, 0, 0, 1])
    mem = np.array([[0.5, 0.05, 0.3, np.nan], [0.4, 0.0, 0.2, 0.1]], np.float32)
    result = forgetting_by_memorization(mask, correct, mem, tasks, high=0.25, low=0.1)
    np.testing.assert_allclose(result["forgetting"][:3], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(result["mem_own"], [0.5, 0.05, 0.3, 0.1])
    summary = result["summary"]
    assert summary["n_high_mem"] == 2 and summary["n_low_mem"] == 1  # task 2's example is left out
    assert summary["forgetting_high_mem"] == pytest.approx(0.25) and summary["forgetting_low_mem"] == 1.0
    np.testing.assert_allclose(task_means(mem, tasks), [[np.mean([0.5, 0.05, 0.3]), np.nan], [0.2, 0.1]])


@pytest.mark.parametrize("extra, sentence", [
    (["--dataset", "perm-digits"], "domain-incremental"),
    (["--record_epochs", "1"], "--record_epochs sets stationary subset plans"),
    (["--savecheck"], "--savecheck is chosen by the stream plan"),
    (["--loadcheck", "x.pt"], "--loadcheck is chosen by the stream plan"),
    (["--covariates"], "--covariates logs a main.py run's metrics"),
    (["--subset_ratio", "0.5,0.7"], "one --subset_ratio"),
])
def test_stream_plan_flags_that_cannot_apply_are_refused_in_one_sentence(tmp_path, extra, sentence):
    with pytest.raises(ConfigError, match=sentence):
        train_splits.parse_args([*STREAM, "--out", str(tmp_path), *extra])


def test_a_task_aware_method_is_refused_by_a_stream_plan(tmp_path):
    argv = [*STREAM, "--out", str(tmp_path)]
    argv[argv.index("--cl_model") + 1] = "pnn"
    with pytest.raises(ConfigError, match="pnn predicts only when told each example's task"):
        train_splits.parse_args(argv)


def test_a_misspelt_learner_flag_is_main_pys_error_and_cl_model_needs_a_stream_plan(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_splits.parse_args([*STREAM, "--out", str(tmp_path), "--bufer_size", "3"])
    assert "--buffer_size" in capsys.readouterr().err  # main.py's parser: did you mean
    with pytest.raises(ConfigError, match="add --plan_kind stream"):
        train_splits.parse_args(["--out", str(tmp_path), "--cl_model", "er", "--lr", "0.1"])
    with pytest.raises(ConfigError, match="needs --cl_model"):
        train_splits.parse_args(["--plan_kind", "stream", "--out", str(tmp_path), "--lr", "0.1"])


def test_a_learner_whose_flags_resolve_differently_now_is_refused(tmp_path, tracking_uri):
    from continual.stream_plan import train_learner

    plan = make_stream_plan(train_splits.parse_args([*STREAM, "--out", str(tmp_path)]))
    plan.settings["continual"]["lr"] = 0.05  # as if main.py's parse of the same flags had changed
    with pytest.raises(ConfigError, match="resolves this stream plan's flags differently now \\(lr\\)"):
        train_learner(plan, 0, "./data", "cpu")
