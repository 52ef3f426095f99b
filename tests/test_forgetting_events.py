"""Forgetting events (Toneva et al. 2019): the counter, main.py --forgetting_events against an independent
recount, the score file through --mem_scores and its refusal for another dataset, and train_splits.py's
per-model counts against a recount from the training forward passes and each model's own data order."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn

import continual.run
import eval_splits
import main
import train_splits
from continual.args import parse_args
from continual.forgetting import StreamRecorder
from continual.run import run as run_experiment
from memorization.driver import run_plan
from memorization.eval_driver import score_store
from memorization.forgetting import ForgettingEvents, count_events, forgetting_values, pool_models
from memorization.score_format import load_scores
from memorization.stacked_mlp import StackedMLP
from memorization.store import SubsetStore
from memorization.training import load_plan_data
from models.er import Er
from utils.checkpoint import save_checkpoint

RUN = ["--dataset", "seq-digits", "--n_tasks", "2", "--n_epochs", "2", "--seed", "0", "--non_verbose",
       "--model", "er", "--buffer_size", "100", "--lr", "0.1"]


def recount(presentations: list[tuple[np.ndarray, np.ndarray]], n: int) -> dict[str, np.ndarray]:
    """Counts from per-step (indices, correct) records: each example's sequence, then `count_events`."""
    sequences = [[] for _ in range(n)]
    for indices, correct in presentations:
        for i, c in zip(indices.tolist(), correct.tolist()):
            sequences[i].append(c)
    events, never = np.zeros(n, np.int64), np.zeros(n, bool)
    for i, sequence in enumerate(sequences):
        if sequence:
            events[i], never[i] = count_events(sequence)
    return {"events": events, "never_learned": never, "presentations": np.array([len(s) for s in sequences])}


def test_events_of_a_hand_made_sequence():
    events, never = count_events([1, 0, 1, 1, 0, 0, 1])
    assert events == 2 and not never  # correct → wrong twice: presentations 1→2 and 4→5
    assert count_events([0, 0, 0]) == (0, True)  # never learned
    assert count_events([1, 1, 1]) == (0, False)  # learned at once, never forgotten
    assert count_events([0, 1, 0, 1, 0])[0] == 2
    columns = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 0]])  # three examples, three presentations each
    assert [e.tolist() for e in count_events(columns)] == [[1, 0, 1], [False, True, False]]
    # Score-file value: the count; never learned = largest count among learned + 1; never presented = NaN.
    values = forgetting_values(np.array([2, 0, 0, 1, 0]), np.array([False, False, True, False, False]),
                               np.array([True, True, True, True, False]))
    np.testing.assert_array_equal(values, [2, 0, 3, 1, np.nan])
    assert values.dtype == np.float32


def counted_as_recounted(counter: ForgettingEvents, records: list[list], n: int) -> dict[str, np.ndarray]:
    """The counter's arrays, each row asserted equal to the recount of its records."""
    arrays = counter.arrays()
    for r, record in enumerate(records):
        expected = recount(record, n)
        for key in ("events", "never_learned", "presentations"):
            np.testing.assert_array_equal(arrays[key][r], expected[key])
    return arrays


def test_the_online_counter_equals_the_count_of_each_sequence():
    rng = np.random.default_rng(0)
    n, rows = 30, 3
    counter = ForgettingEvents(n, "cpu", rows=rows)
    counter.FLUSH_STEPS = 7  # counted in several passes: each carries the last correctness over to the next
    records = [[] for _ in range(rows)]
    chance = np.linspace(0, 0.9, n)  # example 0 is never right; examples n-2 and n-1 are never presented
    for _ in range(60):
        index = np.stack([rng.permutation(n - 2)[:8] for _ in range(rows)])
        correct, valid = rng.random(index.shape) < chance[index], rng.random(index.shape) < 0.9
        counter.update(torch.as_tensor(index), torch.as_tensor(correct), torch.as_tensor(valid))
        for r in range(rows):
            records[r].append((index[r][valid[r]], correct[r][valid[r]]))
    arrays = counted_as_recounted(counter, records, n)
    assert arrays["events"].sum() > 0 and arrays["never_learned"][:, 0].all()
    assert (arrays["presentations"][:, -2:] == 0).all() and not arrays["never_learned"][:, -2:].any()


def test_whole_epochs_counted_at_once_equal_the_count_of_each_sequence():
    """count_once (subset training: an epoch presents each example once per model) between queued steps."""
    rng = np.random.default_rng(1)
    n, rows = 30, 3
    counter = ForgettingEvents(n, "cpu", rows=rows)
    records = [[] for _ in range(rows)]
    chance = np.linspace(0, 0.9, n)
    for epoch in range(12):
        index = np.stack([rng.permutation(n - 2)[:20] for _ in range(rows)])  # n-2, n-1: never presented
        correct = rng.random(index.shape) < chance[index]
        if epoch % 3 == 2:  # as queued steps, then counted at once: the order of presentations is kept
            counter.update(torch.as_tensor(index[:, :5]), torch.as_tensor(correct[:, :5]))
            counter.count_once(torch.as_tensor(index[:, 5:]), torch.as_tensor(correct[:, 5:]))
        else:
            counter.count_once(torch.as_tensor(index), torch.as_tensor(correct))
        for r in range(rows):
            records[r].append((index[r], correct[r]))
    arrays = counted_as_recounted(counter, records, n)
    assert arrays["events"].sum() > 20 and arrays["never_learned"][:, 0].all()
    with pytest.raises(ValueError, match="twice"):
        counter.count_once(torch.tensor([[1, 1], [2, 3], [4, 5]]), torch.ones(3, 2, dtype=torch.bool))


class _Concatenating(nn.Module):
    """A model whose one forward pass holds the stream batch then other rows (as ER's does)."""

    def __init__(self, net, other):
        super().__init__()
        self.net, self.other = net, other

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        return self.net(torch.cat([inputs, self.other])).sum()


class _MemoryOnly(_Concatenating):
    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        return None  # no forward pass on the stream (gdumb's stream only fills its memory)


def test_the_recorder_reads_the_stream_rows_and_falls_back_to_one_forward_pass():
    net = nn.Linear(4, 3)
    inputs, labels, indices = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), torch.tensor([4, 0, 2, 7, 9])
    correct = net(inputs).argmax(1) == labels
    for model in (_Concatenating(net, torch.randn(3, 4)), _MemoryOnly(net, None)):
        recorder = StreamRecorder(10, "cpu")
        recorder.observe(model.net, model.observe, inputs, labels, inputs, indices, 0)
        arrays = recorder.events.arrays()
        assert arrays["presentations"][0][indices].tolist() == [1] * 5 and arrays["presentations"].sum() == 5
        assert arrays["never_learned"][0][indices].tolist() == (~correct).tolist()
        assert recorder.extra_forwards == (1 if isinstance(model, _MemoryOnly) else 0)
        recorder.detach()
        assert not net._forward_hooks


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """One tiny ER run with --forgetting_events; every cross-entropy call inside observe is recorded
    independently of the recorder: its first B rows are the stream batch."""
    folder = tmp_path_factory.mktemp("forgetting")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    presented = []
    original, cross_entropy = Er.observe, F.cross_entropy

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        def recording(logits, targets, *args, **kwargs):
            assert torch.equal(targets[:len(labels)], labels)
            presented.append((indices.numpy().copy(), (logits[:len(labels)].argmax(1) == labels).numpy()))
            return cross_entropy(logits, targets, *args, **kwargs)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.nn.functional, "cross_entropy", recording)
            return original(self, inputs, labels, not_aug_inputs, indices, task)

    def keep_first(path, content):  # the checkpoint after task 0 stays for the resume test
        save_checkpoint(path, content)
        if content["next_task"] == 1:
            shutil.copy(path, folder / "after_task_0.pt")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Er, "observe", observe)
        patch.setattr(continual.run, "save_checkpoint", keep_first)
        state = run_experiment(parse_args([*RUN, "--tracking_uri", uri, "--forgetting_events", "--savecheck",
                                           "--checkpoint_dir", str(folder / "checkpoints")]))
    client = MlflowClient(uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("continual-learning").experiment_id])
    files = folder / "artifacts"
    files.mkdir()
    client.download_artifacts(logged.info.run_id, "forgetting", str(files))
    return {"state": state, "presented": presented, "files": files / "forgetting", "run": logged, "folder": folder}


def test_main_records_the_events_of_an_independent_recount(recorded_run):
    files, n = recorded_run["files"], 1438
    expected = recount(recorded_run["presented"], n)
    counts = np.load(files / "counts.npy")
    np.testing.assert_array_equal(counts, expected["events"])
    np.testing.assert_array_equal(np.load(files / "never_learned.npy"), expected["never_learned"])
    np.testing.assert_array_equal(np.load(files / "presentations.npy"), expected["presentations"])
    assert set(expected["presentations"].tolist()) == {2}  # every example, once per epoch of its task
    assert counts.sum() > 0 and expected["never_learned"].any()
    values = np.load(files / "events.npy")
    np.testing.assert_array_equal(values, forgetting_values(counts, expected["never_learned"], np.ones(n, bool)))
    meta = json.loads((files / "events.json").read_text())
    assert meta["dataset"] == "seq-digits" and meta["n"] == n and meta["presentations_not_found"] == 0
    assert meta["never_learned_value"] == counts[~expected["never_learned"]].max() + 1
    metrics = recorded_run["run"].data.metrics
    assert metrics["forgetting_events/n_never_learned"] == expected["never_learned"].sum()
    client = MlflowClient(f"sqlite:///{recorded_run['folder'] / 'mlflow.db'}")
    history = client.get_metric_history(recorded_run["run"].info.run_id, "forgetting_events/n_never_learned")
    assert [m.step for m in history] == [2]  # the number of tasks trained, as every task-level metric


def test_a_resumed_run_counts_what_an_uninterrupted_one_does(recorded_run):
    args = parse_args([*RUN, "--forgetting_events", "--resume", str(recorded_run["folder"] / "after_task_0.pt")])
    resumed = run_experiment(args).forgetting.events.arrays()
    np.testing.assert_array_equal(resumed["events"][0], np.load(recorded_run["files"] / "counts.npy"))
    np.testing.assert_array_equal(resumed["presentations"][0], np.load(recorded_run["files"] / "presentations.npy"))


def test_recording_changes_no_result(recorded_run):
    uri = f"sqlite:///{recorded_run['folder'] / 'plain.db'}"
    plain = run_experiment(parse_args([*RUN, "--tracking_uri", uri]))
    for setting, matrix in recorded_run["state"].matrices.items():
        np.testing.assert_array_equal(matrix, plain.matrices[setting])


def test_the_events_file_is_a_score_file_and_another_dataset_is_refused(recorded_run, capsys):
    path = str(recorded_run["files"] / "events.npy")
    uri = f"sqlite:///{recorded_run['folder'] / 'scores.db'}"
    argv = ["--dataset", "seq-digits", "--n_tasks", "2", "--n_epochs", "1", "--seed", "1", "--non_verbose",
            "--model", "sgd", "--lr", "0.1", "--tracking_uri", uri, "--mem_scores", path, "--bucket_thresholds", "0,1"]
    run_experiment(parse_args(argv))
    client = MlflowClient(uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("continual-learning").experiment_id])
    assert {"train_acc/low", "train_acc/high"} <= set(logged.data.metrics)  # the per-bucket accuracy it drives
    for dataset, sentence in (("perm-digits", f"--mem_scores {path} was computed on seq-digits, not perm-digits"),
                              ("random-label-digits", f"--mem_scores {path} holds (1438,) scores but "
                                                      f"random-label-digits has 1000 training examples")):
        capsys.readouterr()
        assert main.main([*argv[2:], "--dataset", dataset, "--n_tasks", "2"]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"error: {sentence}") and "\n" not in error and error.count(". ") == 0


def test_split_training_counts_equal_a_recount_and_eval_splits_pools_them(tmp_path, monkeypatch):
    steps = []
    train_step = StackedMLP.train_step

    def recording(ensemble, x, y, **options):  # each step's predictions, from a forward pass of their own
        steps.append((ensemble(x).argmax(-1).flatten().numpy().copy(), y.flatten().numpy().copy()))
        return train_step(ensemble, x, y, **options)

    monkeypatch.setattr(StackedMLP, "train_step", recording)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_plan(train_splits.parse_args(["--dataset", "seq-digits", "--n_models", "2", "--ensemble", "2",
                                      "--subset_ratio", "0.5", "--n_epochs", "3", "--lr", "0.1", "--batch_size", "64",
                                      "--mlp_hidden", "32", "--classes", "0,3", "--out", str(tmp_path / "store"),
                                      "--tracking_uri", uri,
                                      "--non_verbose"]))
    monkeypatch.undo()
    store = SubsetStore(tmp_path / "store")
    plan = store.load_plan()
    data = load_plan_data(plan, "./data", "cpu")
    labels = data.train_labels.numpy()
    size, batch, stored = int(plan.inclusion_mask[0].sum()), 64, []
    for k in range(2):  # model k's rows of every step, from its own seed, as the plan defines its data order
        subset = np.flatnonzero(plan.inclusion_mask[k])
        generator = torch.Generator().manual_seed(int(plan.model_seed[k]) + 1)
        order = [subset[torch.randperm(size, generator=generator).numpy()] for _ in range(3)]
        rows = [epoch[start:start + batch] for epoch in order for start in range(0, size, batch)]
        records = []
        for step_rows, (predicted, targets) in zip(rows, steps):
            predicted, targets = predicted.reshape(2, -1)[k], targets.reshape(2, -1)[k]
            assert (targets == labels[step_rows]).all()
            records.append((step_rows, predicted == targets))
        expected = recount(records, plan.inclusion_mask.shape[1])
        model = store.read_model(k, plan)
        np.testing.assert_array_equal(model["forget_events_train"], expected["events"])
        np.testing.assert_array_equal(model["never_learned_train"], expected["never_learned"])
        assert (expected["presentations"] == 3 * plan.inclusion_mask[k]).all()
        stored.append(model)
    assert len(steps) == len(rows)
    score_store(eval_splits.parse_args(["--run_dir", str(tmp_path / "store"), "--out", str(tmp_path / "mem.npy"),
                                        "--tracking_uri", uri]))
    pooled = np.load(tmp_path / "mem_forgetting.npy")
    expected = pool_models(np.stack([m["forget_events_train"] for m in stored]),
                           np.stack([m["never_learned_train"] for m in stored]), plan.inclusion_mask)["value"]
    np.testing.assert_array_equal(pooled[plan.train_indices], expected)
    np.testing.assert_array_equal(load_scores(str(tmp_path / "mem_forgetting.npy"), data.dataset), pooled)
    assert (tmp_path / "mem_report" / "forgetting_vs_mem.png").exists()
    assert "spearman_forgetting_mem" in (tmp_path / "mem_report" / "summary.md").read_text()


def test_pooling_averages_each_model_value_over_the_models_that_trained_on_the_example():
    mask = np.array([[1, 1, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1]], bool)
    events = np.array([[2, 0, 0, 0], [1, 0, 0, 4], [0, 3, 0, 0]])
    never = np.array([[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 1]], bool)  # example 3 never learned by models 0, 2
    pooled = pool_models(events, never, mask)
    # model values: m0 [2, 0, -, 2+1], m1 [1, -, -, 4], m2 [-, 3, -, 3+1]
    np.testing.assert_allclose(pooled["value"], [1.5, 1.5, np.nan, (3 + 4 + 4) / 3])
    np.testing.assert_allclose(pooled["never_learned_fraction"], [0, 0, np.nan, 2 / 3])

