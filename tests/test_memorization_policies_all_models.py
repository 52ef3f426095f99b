"""The memorization buffer policies for every replay model that fills its buffer through --buffer_policy:
the exact examples kept after each task, DER's logits for them, the records logged, and the refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import main
from backbones import BACKBONES
from continual.args import parse_args
from continual.run import set_seed
from continual.records import RunRecords
from continual.training import RunState, train_task
from datasets import DATASETS
from memorization.score_format import load_scores
from models import MODELS
from utils.mlflow_logger import RecordingLogger

N_TRAIN = 1438  # seq-digits' training examples
BUFFER = 40
TASKS = 3  # the third task gives uneven quotas: 40 slots over 3 tasks = 14, 13, 13


@pytest.fixture(scope="module")
def score_file(tmp_path_factory):
    """Score of dataset row i: (7919 · i) mod 1438, a permutation of 0..1437, so every value is distinct and
    the order of the scores is not the order of the rows."""
    path = tmp_path_factory.mktemp("scores") / "scores.npy"
    np.save(path, ((np.arange(N_TRAIN) * 7919) % N_TRAIN).astype(np.float32))
    return path


def build(name: str, policy: str, score_file, *extra: str):
    args = parse_args(["--dataset", "seq-digits", "--model", name, "--buffer_policy", policy, "--buffer_size",
                       str(BUFFER), "--mem_scores", str(score_file), "--lr", "0.1", "--n_epochs", "1", "--seed", "0",
                       "--device", "cpu", "--non_verbose", *extra])
    set_seed(0)
    dataset = DATASETS.get(args.dataset)(args)
    dataset.mem_scores = load_scores(args.mem_scores, dataset)
    net = BACKBONES.get(args.backbone)(args, dataset.SHAPE, dataset.N_CLASSES)
    return MODELS.get(name)(net, dataset, args), dataset, args


def class_quota(c: int, n_tasks_seen: int, classes_per_task: int = 2) -> int:
    """Slots of class c with n_tasks_seen tasks: the buffer split evenly over the tasks, then over the task's
    classes, remainders to the first ones (written out here, apart from the policy's code)."""
    task, position = divmod(c, classes_per_task)
    share = BUFFER // n_tasks_seen + (1 if task < BUFFER % n_tasks_seen else 0)
    return share // classes_per_task + (1 if position < share % classes_per_task else 0)


def expected_kept(policy: str, scores: np.ndarray, labels: np.ndarray, task: int) -> dict[int, set[int]]:
    """Per class seen, the dataset rows the buffer must hold after `task`. A class keeps its quota's lowest
    (min) or highest (max) scores among all its training examples: chosen so at the end of its task, and
    each later shrink keeps the policy's end of what was kept, so the choice stays the class's extreme."""
    kept = {}
    for c in range(2 * (task + 1)):
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(scores[members], kind="stable")]
        k = class_quota(c, task + 1)
        kept[c] = set((order[:k] if policy == "min" else order[len(order) - k:]).tolist())
    return kept


@pytest.mark.parametrize("policy", ["min", "max"])
@pytest.mark.parametrize("name", ["er", "der", "derpp", "er_ace"])
def test_the_buffer_holds_exactly_the_policys_choice_after_every_task(name, policy, score_file):
    model, dataset, args = build(name, policy, score_file)
    scores = dataset.mem_scores
    labels = dataset.train.labels.numpy()
    state, logger = RunState.fresh(dataset), RecordingLogger(run_id="x")
    logits_at_end = {}  # dataset row → eval-mode logits at the end of the row's task
    for task in range(TASKS):
        train_task(model, dataset, task, args, RunRecords(logger), state)
        stored = model.buffer.get_all()
        indices = stored["indices"].numpy()
        assert len(indices) == BUFFER and len(set(indices.tolist())) == BUFFER
        held = {c: set(indices[stored["labels"].numpy() == c].tolist()) for c in np.unique(labels[indices])}
        assert held == expected_kept(policy, scores, labels, task), (name, policy, task)
        # every field of a slot belongs to the same example
        assert torch.equal(stored["examples"], dataset.train.images[stored["indices"]])
        assert torch.equal(stored["labels"], dataset.train.labels[stored["indices"]])
        assert torch.equal(stored["task_labels"], stored["labels"] // 2)
        if name in ("der", "derpp"):
            model.net.eval()
            with torch.no_grad():
                now = model.net(dataset.test_transform(stored["examples"]))
            model.net.train()
            new = stored["task_labels"] == task
            # the examples chosen now carry the network's eval-mode logits at the end of this task ...
            torch.testing.assert_close(stored["logits"][new], now[new])
            # ... and those kept from earlier tasks still carry theirs
            for row, logits in zip(indices[~new.numpy()], stored["logits"][~new]):
                torch.testing.assert_close(logits, logits_at_end[int(row)])
            logits_at_end.update({int(r): l for r, l in zip(indices[new.numpy()], now[new])})
        else:
            assert "logits" not in stored
        record = model.task_record(task)
        np.testing.assert_array_equal(record["arrays"][f"buffer/indices_task_{task + 1}.npy"], indices)
        assert record["metrics"] == {"mem_values_undefined": 0,
                                     **{f"buffer_count_class_{c}": class_quota(c, task + 1)
                                        for c in range(2 * (task + 1))}}
        task_values, buffer_values = record["histograms"][f"buffer/values_task_{task + 1}.png"]
        np.testing.assert_array_equal(buffer_values, scores[indices])
        assert len(task_values) == len(dataset.train_split(task))


def test_agem_memory_is_the_policys_choice(score_file):
    model, dataset, args = build("agem", "min", score_file)
    labels = dataset.train.labels.numpy()
    state = RunState.fresh(dataset)
    for task in range(2):
        train_task(model, dataset, task, args, RunRecords(RecordingLogger(run_id="x")), state)
        stored = model.buffer.get_all()
        held = {c: set(stored["indices"][stored["labels"] == c].tolist()) for c in range(2 * (task + 1))}
        assert held == expected_kept("min", dataset.mem_scores, labels, task)


def run_main(argv: list[str], tracking_uri: str, capsys) -> tuple[int, str]:
    code = main.main([*argv, "--lr", "0.1", "--non_verbose", "--tracking_uri", tracking_uri])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("name", ["er", "der", "derpp", "er_ace", "agem"])
def test_a_replay_model_without_scores_is_refused_in_one_sentence(name, tracking_uri, capsys):
    code, err = run_main(["--model", name, "--buffer_size", "50", "--buffer_policy", "min"], tracking_uri, capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert f"which {name} does not compute" in err and "--mem_scores FILE.npy" in err


@pytest.mark.parametrize("name", ["icarl", "xder"])
def test_models_that_choose_their_own_exemplars_still_refuse_a_memorization_policy(name, score_file, tracking_uri,
                                                                                    capsys):
    code, err = run_main(["--model", name, "--buffer_size", "50", "--buffer_policy", "min", "--mem_scores",
                          str(score_file)], tracking_uri, capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert f"{name} chooses its exemplars itself" in err and "--buffer_policy min would have no effect" in err


def test_er_with_a_memorization_policy_runs_end_to_end_and_logs_its_buffer(score_file, tracking_uri, capsys):
    code, err = run_main(["--model", "er", "--buffer_policy", "min", "--mem_scores", str(score_file),
                          "--buffer_size", "30", "--n_epochs", "1", "--seed", "0"],
                         tracking_uri, capsys)
    assert code == 0, err
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("continual-learning").experiment_id])
    assert run.info.status == "FINISHED"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "buffer")}
    assert {f"buffer/indices_task_{t}.npy" for t in range(1, 6)} <= files
    kept = np.load(client.download_artifacts(run.info.run_id, "buffer/indices_task_5.npy"), allow_pickle=False)
    scores = np.load(score_file)
    labels = DATASETS.get("seq-digits")(parse_args(["--model", "er", "--buffer_size", "30", "--lr", "0.1", "--seed", "0"])).train.labels.numpy()
    # 30 slots over 10 classes: the 3 lowest-scored examples of each class
    expected = [np.flatnonzero(labels == c)[np.argsort(scores[labels == c], kind="stable")[:3]] for c in range(10)]
    assert sorted(kept.tolist()) == sorted(np.concatenate(expected).tolist())
    assert all(run.data.metrics[f"model/buffer_count_class_{c}"] == 3 for c in range(10))
