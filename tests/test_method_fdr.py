"""FDR (models/fdr.py): the two steps of a batch and the buffer's per-task shares against computations by
hand, the memorization policies' choice with the stored outputs, and Mammoth's numbers.

The MAMMOTH_* numbers were computed by Mammoth's own code (its work tree at commit e75a491, torch 2.14 on
CPU, one thread) and printed by `/work/mammoth-venv/bin/python benchmarks/mammoth_parity_hal_fdr.py`: its
`models/fdr.py` on its MNISTMLP, from the fixed weights of `benchmarks/mammoth_parity_lockstep.py`, on the
script's FDR scenario (seq-mnist, three tasks of three batches of 4 covering each task's 12 training
examples, a buffer of 24 replayed whole: after task 0 it holds task 0's 12 examples, after task 1 both
tasks' 24 on both sides, so no random choice matters).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from benchmarks.mammoth_parity_hal_fdr import FDR, run_ours, write_scenario_mnist
from continual.args import parse_args
from continual.records import RunRecords
from continual.training import RunState, train_task
from models.fdr import function_distance
from tests.conftest import build_model, train_steps
from tests.test_memorization_policies_all_models import N_TRAIN, build, expected_kept
from utils.errors import ConfigError
from utils.mlflow_logger import RecordingLogger

MAMMOTH = {
    "losses": [2.4512665271759033, 1.5849100351333618, 1.0349010229110718, 0.7584795951843262, 1.1917486190795898,
               1.1975269317626953, 0.8829566836357117, 1.0130599737167358, 1.2097700834274292],
    "weights": {  # name: [sum, sum of squares, first entry], after the 9 steps
        "layers.0.weight": [-197.5789283628385, 179.04327604526742, -0.08210790902376175],
        "layers.0.bias": [-0.5023178557967185, 0.006629393070191152, -0.0020949176978319883],
        "layers.1.weight": [-27.822384156047256, 99.01494894428347, -0.15498921275138855],
        "layers.1.bias": [-0.7128427934076171, 0.020840927386390224, -0.01877054013311863],
        "head.weight": [0.19151108351070434, 19.299294122934977, -0.16892565786838531],
        "head.bias": [1.862645149230957e-09, 0.0268710550872361, 0.024607492610812187],
    },
    "buffer_logits_after_task_0": [-13.697614206001163, 386.3423823683886],  # sum, sum of squares
    "buffer_logits_after_task_1": [-1.945939490571618, 879.2585335121321],
}


def close(actual, expected) -> None:
    assert actual == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_steps_and_stored_outputs_equal_mammoths(tmp_path):
    write_scenario_mnist(tmp_path, FDR)
    ours = run_ours("fdr", str(tmp_path))
    close(ours["losses"], MAMMOTH["losses"])
    for name, expected in MAMMOTH["weights"].items():
        close(ours["weights"][name], expected)
    for task in (0, 1):
        key = f"buffer_logits_after_task_{task}"
        close(ours[key], MAMMOTH[key])


def stream_batch(dataset, task: int, rows):
    split = dataset.train_split(task)
    rows = torch.as_tensor(rows)
    raw = split.images[rows]
    return dataset.train_transform(raw), split.labels[rows], raw, split.indices[rows]


def test_function_distance_is_the_mean_l2_distance_between_softmaxes():
    outputs, stored = torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    p = 1 / (1 + np.exp(-2.0))  # softmax([2, 0])[0]
    by_hand = (0.0 + np.sqrt(2) * (p - 0.5)) / 2  # ‖(p, 1 − p) − (½, ½)‖ = √2 (p − ½)
    assert function_distance(outputs, stored).item() == pytest.approx(by_hand, rel=1e-6)
    same = torch.randn(3, 5, requires_grad=True)
    function_distance(same, same.detach()).backward()  # zero distance: a zero gradient, not NaN
    assert torch.equal(same.grad, torch.zeros(3, 5))


def test_a_batch_steps_on_its_cross_entropy_then_on_the_weighted_function_distance():
    model, dataset = build_model("--buffer_size", "30", "--minibatch_size", "8", "--alpha", "0.5", model="fdr")
    train_steps(model, dataset, 3, task=0, batch_size=16)
    assert model.buffer.is_empty()  # the stream never enters the buffer
    model.lifecycle.end_task(0)
    inputs, labels, raw, indices = stream_batch(dataset, 1, range(16))
    before, buffer_before = copy.deepcopy(model.net), copy.deepcopy(model.buffer)
    torch.manual_seed(4)
    loss = model.lifecycle.observe(inputs, labels, raw, indices, 1)
    model.lifecycle.step(loss)

    params = list(before.parameters())
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(before(inputs), labels), params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= 0.05 * g  # --lr 0.05
    torch.manual_seed(4)  # the replay draw follows the first step
    replay = buffer_before.get_data(8, transform=dataset.train_transform)
    by_hand = 0.5 * torch.linalg.vector_norm(before(replay["examples"]).softmax(1) - replay["logits"].softmax(1),
                                             dim=1).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    for (name, p), g in zip(before.named_parameters(), torch.autograd.grad(by_hand, params)):
        torch.testing.assert_close(model.net.get_parameter(name), p - 0.05 * g, rtol=0, atol=1e-6)
    assert model.plasticity.step == 5  # two steps for this batch
    assert len(model.buffer) == 30  # the stream batch is not stored
    assert torch.equal(model.buffer.get_all()["indices"], buffer_before.get_all()["indices"])


def test_each_task_seen_keeps_an_equal_share_with_the_outputs_at_its_end():
    model, dataset = build_model("--buffer_size", "31", model="fdr")
    first_rows, logits_at_end = {}, {}
    for task in range(3):
        model.lifecycle.begin_task(task)
        train_steps(model, dataset, 2, task=task, batch_size=16)
        model.lifecycle.end_task(task)
        stored = model.buffer.get_all()
        share = 31 // (task + 1)
        assert len(model.buffer) == share * (task + 1)
        assert stored["task_labels"].tolist() == sorted(stored["task_labels"].tolist())  # task by task
        for t in range(task + 1):
            rows = stored["indices"][stored["task_labels"] == t].tolist()
            assert len(rows) == share and set(dataset.train.labels[rows].tolist()) <= set(dataset.task_classes(t))
            if t < task:  # an earlier task keeps the first examples it held
                assert rows == first_rows[t][:share]
        first_rows[task] = stored["indices"][stored["task_labels"] == task].tolist()
        new = stored["task_labels"] == task
        torch.testing.assert_close(stored["logits"][new], model.eval_logits(stored["examples"][new]))
        for row, logits in zip(stored["indices"][~new].tolist(), stored["logits"][~new]):
            torch.testing.assert_close(logits, logits_at_end[row])  # the outputs stored at the end of its task
        logits_at_end.update(zip(stored["indices"][new].tolist(), stored["logits"][new]))
        assert torch.equal(stored["examples"], dataset.train.images[stored["indices"]])
        assert torch.equal(stored["labels"], dataset.train.labels[stored["indices"]])


@pytest.fixture
def score_file(tmp_path):
    """Distinct scores in an order unrelated to the rows, as tests/test_memorization_policies_all_models.py's."""
    path = tmp_path / "scores.npy"
    np.save(path, ((np.arange(N_TRAIN) * 7919) % N_TRAIN).astype(np.float32))
    return path


def test_a_memorization_policy_chooses_the_shares_and_they_carry_their_outputs(score_file):
    model, dataset, args = build("fdr", "min", score_file)
    labels = dataset.train.labels.numpy()
    state = RunState.fresh(dataset)
    for task in range(2):
        train_task(model, dataset, task, args, RunRecords(RecordingLogger(run_id="x")), state)
        stored = model.buffer.get_all()
        held = {c: set(stored["indices"][stored["labels"] == c].tolist()) for c in range(2 * (task + 1))}
        assert held == expected_kept("min", dataset.mem_scores, labels, task)
        new = stored["task_labels"] == task
        torch.testing.assert_close(stored["logits"][new], model.eval_logits(stored["examples"][new]))


def test_a_buffer_smaller_than_the_task_count_is_refused():
    with pytest.raises(ConfigError, match="over 5 tasks; pass --buffer_size of at least 5$"):
        parse_args(["--model", "fdr", "--dataset", "seq-digits", "--buffer_size", "4", "--lr", "0.1"])
