"""Memorization-aware replay: quotas, the policies' exact choices, the proxies, score files, bad input."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import continual.run
import main
from continual.run import run as run_experiment
from backbones import BACKBONES
from buffer_policies._memorization import quotas
from datasets import DATASETS
from models import MODELS
from continual.args import parse_args
from memorization.plan import fingerprint
from memorization.score_format import load_scores, original_train_labels
from models._memorization_proxy import MemorizationProxy


def build(policy: str, buffer_size: int, scores: np.ndarray | None, *extra: str):
    values = ["--mem_proxy", "learned_iteration"]
    if scores is not None:  # a score file, as eval_splits.py writes one (length checked when loaded)
        path = Path(tempfile.mkdtemp()) / "scores.npy"
        np.save(path, scores)
        values = ["--mem_proxy", "none", "--mem_scores", str(path)]
    args = parse_args(["--model", "maer", "--buffer_policy", policy, "--buffer_size", str(buffer_size), "--lr", "0.1",
                       "--seed", "0", "--device", "cpu", *values, *extra])
    torch.manual_seed(0)
    dataset = DATASETS.get(args.dataset)(args)
    dataset.mem_scores = None if scores is None else load_scores(args.mem_scores, dataset)
    backbone = BACKBONES.get(args.backbone)(args, dataset.SHAPE, dataset.N_CLASSES)
    return MODELS.get("maer")(backbone, dataset, args), dataset


def stream_task(model, dataset, task: int) -> None:
    model.lifecycle.begin_task(task)
    split = dataset.train_split(task)
    for start in range(0, len(split), 32):
        raw = split.images[start:start + 32]
        loss = model.lifecycle.observe(dataset.train_transform(raw), split.labels[start:start + 32], raw,
                             split.indices[start:start + 32], task)
        model.lifecycle.step(loss)
    model.lifecycle.end_task(task)


def test_quotas_split_the_buffer_by_task_then_by_class():
    tasks = [range(0, 2), range(2, 4), range(4, 6)]
    assert quotas(50, 1, tasks) == {0: 25, 1: 25}
    assert quotas(50, 2, tasks) == {0: 13, 1: 12, 2: 13, 3: 12}
    # 50 // 3 = 16 per task, the remainder 2 to the first two tasks.
    assert quotas(50, 3, tasks) == {0: 9, 1: 8, 2: 9, 3: 8, 4: 8, 5: 8}


def expected_choice(policy: str, values: np.ndarray, k: int) -> np.ndarray:
    """The positions each policy keeps, written out independently of the implementation."""
    order = np.argsort(values, kind="stable")
    n = len(order)
    return {
        "min": order[:k],
        "max": order[n - k:],
        "middle": order[max(0, min(n - k, n // 2 - k // 2)):][:k],
        "0.1min": order[min(int(0.1 * n), n - k):][:k],
        "0.9max": order[max(n - int(0.1 * n), k) - k:max(n - int(0.1 * n), k)],
    }[policy]


@pytest.mark.parametrize("policy", ["min", "middle", "max", "0.1min", "0.9max"])
def test_each_policy_keeps_exactly_the_expected_dataset_indices_after_every_task(policy):
    n_train = 1438
    scores = np.random.default_rng(1).permutation(n_train).astype(np.float32)  # distinct, known values
    model, dataset = build(policy, 40, scores, "--n_epochs", "1")
    kept_before = {}  # the buffer after the task before (task 0 has no earlier class to read it)
    for task in range(3):
        stream_task(model, dataset, task)
        quota = quotas(40, task + 1, [dataset.task_classes(t) for t in range(task + 1)])
        stored = model.buffer.get_all()
        labels, indices = stored["labels"].numpy(), stored["indices"].numpy()
        assert len(labels) == 40
        for c, k in quota.items():
            members = np.flatnonzero(dataset.train.labels.numpy() == c)  # class c, dataset order
            if c in dataset.task_classes(task):  # chosen from the whole task just now
                expected = members[expected_choice(policy, scores[members], k)]
            else:  # an earlier class shrinks, keeping its examples in the policy's order
                previous = np.flatnonzero(kept_before["labels"] == c)
                earlier = kept_before["indices"][previous]
                expected = earlier[expected_choice(policy, scores[earlier], k)]
            assert sorted(indices[labels == c].tolist()) == sorted(expected.tolist()), (policy, task, c)
        kept_before = {"labels": labels.copy(), "indices": indices.copy()}


def test_longtail_fraction_reserves_the_most_memorized_examples():
    scores = np.arange(1438, dtype=np.float32)  # score = dataset index
    model, dataset = build("min", 20, scores, "--n_epochs", "1", "--longtail_fraction", "0.2")
    stream_task(model, dataset, 0)
    stored = model.buffer.get_all()
    for c in (0, 1):
        members = np.flatnonzero(dataset.train.labels.numpy() == c)
        kept = sorted(stored["indices"][stored["labels"] == c].tolist())
        assert kept == sorted(members[:8].tolist() + members[-2:].tolist())  # 8 lowest + 2 highest of 10


def test_undefined_scores_are_never_chosen_while_defined_ones_remain():
    scores = np.arange(1438, dtype=np.float32)
    scores[::2] = np.nan
    model, dataset = build("max", 20, scores, "--n_epochs", "1")
    stream_task(model, dataset, 0)
    assert np.isfinite(scores[model.buffer.get_all()["indices"].numpy()]).all()
    assert model.task_record(0)["metrics"]["mem_values_undefined"] == int(
        np.isnan(scores[dataset.train_split(0).indices.numpy()]).sum())


def test_randomized_never_keeps_the_top_decile_and_follows_the_seed():
    scores = np.random.default_rng(2).random(1438).astype(np.float32)
    kept = []
    for _ in range(2):
        model, dataset = build("randomized", 20, scores, "--n_epochs", "1")
        stream_task(model, dataset, 0)
        kept.append(sorted(model.buffer.get_all()["indices"].tolist()))
    assert kept[0] == kept[1]
    for c in (0, 1):
        members = np.flatnonzero(dataset.train.labels.numpy() == c)
        top = set(members[np.argsort(scores[members])][len(members) - int(0.1 * len(members)):].tolist())
        assert not top & set(kept[0])


def test_learned_iteration_records_the_last_time_an_example_was_learned_for_good():
    proxy = MemorizationProxy("learned_iteration", 4, "cpu")
    # Per step, whether each of 4 examples (label 0) is predicted correctly.
    pattern = [[1, 0, 1, 1],
               [0, 0, 1, 1],
               [1, 0, 1, 1],
               [1, 0, 1, 0]]
    for correct in pattern:
        logits = torch.tensor([[2.0, 0.0] if c else [0.0, 2.0] for c in correct])
        proxy.update(torch.arange(4), logits, torch.zeros(4, dtype=torch.long), torch.zeros(4))
    # Learned at 0, forgotten at 1, learned for good at 2; never learned; learned at 0 and kept; forgotten last.
    np.testing.assert_array_equal(proxy.values(), [2.0, np.nan, 0.0, np.nan])


def test_cumulative_loss_sums_every_pass_and_unseen_examples_are_undefined():
    proxy = MemorizationProxy("cumulative_loss", 4, "cpu")
    proxy.update(torch.tensor([0, 1]), torch.zeros(2, 2), torch.tensor([0, 1]), torch.tensor([0.5, 1.0]))
    proxy.update(torch.tensor([1, 2]), torch.zeros(2, 2), torch.tensor([0, 1]), torch.tensor([0.25, 2.0]))
    np.testing.assert_allclose(proxy.values(), [0.5, 1.25, 2.0, np.nan])


def test_score_files_are_checked_against_the_dataset(tmp_path):
    _, dataset = build("min", 20, np.zeros(1438, np.float32))
    np.save(tmp_path / "short.npy", np.zeros(100, np.float32))
    with pytest.raises(Exception, match="holds \\(100,\\) scores but seq-digits has 1438 training examples"):
        load_scores(str(tmp_path / "short.npy"), dataset)
    np.save(tmp_path / "other.npy", np.zeros(1438, np.float32))
    (tmp_path / "other.json").write_text(json.dumps({"dataset": "seq-mnist"}))
    with pytest.raises(Exception, match="was computed on seq-mnist, not seq-digits"):
        load_scores(str(tmp_path / "other.npy"), dataset)
    (tmp_path / "other.json").write_text(json.dumps({"dataset": "seq-digits", "label_fingerprint": "0" * 16}))
    with pytest.raises(Exception, match="computed on other training labels"):
        load_scores(str(tmp_path / "other.npy"), dataset)
    (tmp_path / "other.json").write_text(json.dumps({"dataset": "seq-digits",
                                                     "label_fingerprint": fingerprint(original_train_labels(dataset))}))
    assert load_scores(str(tmp_path / "other.npy"), dataset).shape == (1438,)


@pytest.mark.parametrize("argv, sentence", [
    (["--model", "sgd", "--buffer_policy", "min"], "--buffer_policy min chooses a replay buffer's contents, but sgd "
                                                   "has no buffer"),
    (["--model", "er", "--buffer_size", "50", "--buffer_policy", "min"], "which er does not compute; use --model maer"),
    (["--model", "maer", "--buffer_size", "5", "--buffer_policy", "min"], "a buffer of 5 cannot keep one example of each "
                                                                          "of seq-digits's 10 classes"),
    (["--model", "maer", "--buffer_size", "50", "--buffer_policy", "min", "--mem_proxy", "none"],
     "maer needs memorization values: pass --mem_scores FILE.npy or a --mem_proxy"),
    (["--model", "maer", "--buffer_size", "50", "--mem_scores", "/nonexistent.npy"], "--mem_scores /nonexistent.npy: no such file"),
    (["--model", "maer", "--buffer_size", "50", "--buffer_policy", "min", "--longtail_fraction", "2"],
     "--longtail_fraction must be in [0, 1] (declared by the buffer policy min), got 2.0; pass a value in that range"),
])
def test_bad_memorization_input_ends_with_one_sentence(tracking_uri, capsys, argv, sentence):
    code = main.main([*argv, "--lr", "0.1", "--tracking_uri", tracking_uri, "--non_verbose"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and sentence in err and "\n" not in err


def test_the_seed_paper_command_line_is_accepted():
    args = parse_args(["--model", "maer", "--buffer_policy", "min", "--dataset", "seq-cifar100", "--lr", "0.1",
                       "--buffer_size", "500", "--n_epochs", "50", "--n_tasks", "10", "--seed", "42",
                       "--ignore_other_metrics", "--nowand"])
    assert (args.model, args.buffer_policy, args.buffer_size, args.n_tasks, args.seed) == ("maer", "min", 500, 10, 42)


def test_maer_logs_its_buffer_and_er_logs_accuracy_per_memorization_bucket(tmp_path, tracking_uri):
    scores = np.random.default_rng(3).random(1438).astype(np.float32) * 0.5
    np.save(tmp_path / "mem.npy", scores)
    common = ["--buffer_size", "30", "--lr", "0.1", "--n_epochs", "2", "--seed", "0", "--non_verbose",
              "--tracking_uri", tracking_uri, "--mem_scores", str(tmp_path / "mem.npy")]
    run_experiment(parse_args(["--model", "maer", "--buffer_policy", "min", "--mem_proxy", "learned_iteration", *common,
                         "--run_name", "maer"]))
    run_experiment(parse_args(["--model", "er", *common, "--run_name", "er"]))
    client = MlflowClient(tracking_uri)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("continual-learning").experiment_id])}
    maer = runs["maer"]
    kept = np.load(client.download_artifacts(maer.info.run_id, "buffer/indices_task_5.npy"), allow_pickle=False)
    assert len(kept) == 30 and len(set(kept.tolist())) == 30
    assert maer.data.metrics["model/buffer_count_class_9"] == 3  # 30 slots over 10 classes after the last task
    assert "model/spearman_learned_iteration_vs_scores" in maer.data.metrics
    assert {a.path for a in client.list_artifacts(maer.info.run_id, "buffer")} >= {"buffer/values_task_1.png"}
    er = runs["er"].data.metrics
    buckets = np.digitize(scores, [0.1, 0.25], right=True)
    assert all(f"train_acc/{b}" in er for b in ("low", "middle", "high"))
    assert 0 <= er["train_acc_high_per_task/task_1"] <= 100 and (buckets == 2).any()


@pytest.mark.slow  # a kill and a resume of real runs
def test_maer_resumes_from_a_checkpoint_to_the_uninterrupted_result(tmp_path, tracking_uri, monkeypatch):
    argv = ["--model", "maer", "--buffer_policy", "middle", "--buffer_size", "30", "--lr", "0.1", "--n_epochs", "3",
            "--seed", "0", "--non_verbose", "--tracking_uri", tracking_uri]
    uninterrupted = run_experiment(parse_args(argv))
    real_save = continual.run.save_checkpoint

    def save_then_stop(path, payload):
        real_save(path, payload)
        if payload["next_task"] == 2:
            raise KeyboardInterrupt  # as if killed right after the checkpoint of task 2

    monkeypatch.setattr(continual.run, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(parse_args([*argv, "--savecheck", "--checkpoint_dir", str(tmp_path)]))
    monkeypatch.setattr(continual.run, "save_checkpoint", real_save)
    (checkpoint,) = tmp_path.glob("*.pt")
    resumed = run_experiment(parse_args([*argv, "--resume", str(checkpoint)]))
    np.testing.assert_array_equal(resumed.matrices["class_il"], uninterrupted.matrices["class_il"])
