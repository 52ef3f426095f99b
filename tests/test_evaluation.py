"""Accuracy matrix and its derived metrics, on hand-made numbers."""
import argparse

import numpy as np
import pytest
import torch

from datasets import DATASETS
from continual.evaluation import average_accuracy, backward_transfer, evaluate, forgetting


MATRIX = np.array([
    [90.0, np.nan, np.nan],
    [70.0, 95.0, np.nan],
    [60.0, 80.0, 85.0],
])


def test_average_accuracy_forgetting_and_backward_transfer():
    assert average_accuracy(MATRIX, 0) == 90.0
    assert average_accuracy(MATRIX, 2) == pytest.approx((60 + 80 + 85) / 3)
    # Forgetting after task 2: task 0 best 90 → 60, task 1 best 95 → 80.
    assert forgetting(MATRIX, 2) == pytest.approx(((90 - 60) + (95 - 80)) / 2)
    assert forgetting(MATRIX, 1) == pytest.approx(20.0)
    assert backward_transfer(MATRIX, 2) == pytest.approx(((60 - 90) + (80 - 95)) / 2)
    assert np.isnan(forgetting(MATRIX, 0)) and np.isnan(backward_transfer(MATRIX, 0))


def test_forgetting_uses_the_best_earlier_accuracy_not_the_first():
    matrix = np.array([[50.0, np.nan, np.nan], [80.0, 90.0, np.nan], [70.0, 90.0, 90.0]])
    assert forgetting(matrix, 2) == pytest.approx(((80 - 70) + 0) / 2)
    assert backward_transfer(matrix, 2) == pytest.approx(((70 - 50) + 0) / 2)


class FixedLogits(torch.nn.Module):
    """Predicts from a lookup: logit row chosen by the first pixel of the image (unique per test image)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, x):
        return self.table[x.view(len(x), -1)[:, 0].round().long()]


def test_class_il_and_task_il_come_from_the_same_logits():
    args = argparse.Namespace(device="cpu", n_tasks=None, data_path=".", download=False, class_order=None,
                              permute_classes=False, label_noise=0.0, seed=0)
    dataset = DATASETS.get("seq-digits")(args)
    # Replace the test images so each carries its own row number in the first pixel.
    n = len(dataset.test)
    dataset.test.images = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    rows = torch.arange(n)
    dataset.test.images.view(n, -1)[:, 0] = 0
    dataset.test_transform = lambda images: images.float()
    dataset.test.images = dataset.test.images.to(torch.int64)  # room for row numbers above 255
    dataset.test.images.view(n, -1)[:, 0] = rows
    labels = dataset.test.labels
    # Every example: the highest logit is the label of the *next* task (wrong in class-IL once that
    # task is seen), the second highest its true label (so task-IL is always right).
    table = torch.zeros(n, 10)
    table[rows, labels] = 1.0
    table[rows, (labels + 2) % 10] = 2.0
    accuracy = evaluate(FixedLogits(table), dataset, last_task=1)
    # After task 1 (classes 0-3 seen): task 0's examples predict class 2/3 → wrong in class-IL;
    # task 1's examples predict class 4/5, which is unseen, so the masked argmax falls back to the label.
    assert accuracy["class_il"].tolist() == [0.0, 100.0]
    assert accuracy["task_il"].tolist() == [100.0, 100.0]


def test_snrs_summary_is_the_mean_terminal_accuracy_of_the_last_tenth_of_a_long_stream():
    from continual.evaluation import LAST_TENTH, last_tenth

    terminal = np.arange(1.0, 26.0)  # 25 tasks: the last ceil(2.5) = 3
    assert last_tenth(terminal, 25) == {LAST_TENTH: np.mean([23.0, 24.0, 25.0])}
    assert last_tenth(terminal[:24], 25) == {}  # only at the stream's end
    assert last_tenth(np.arange(1.0, 6.0), 5) == {}  # not a long stream


def test_a_long_stream_logs_snrs_summary_at_its_end():
    from continual.args import parse_args
    from continual.run import run
    from utils.mlflow_logger import RecordingLogger

    logger = RecordingLogger("long")
    run(parse_args(["--model", "sgd", "--dataset", "random-label-digits", "--n_tasks", "20", "--n_epochs", "1",
                    "--lr", "0.1", "--seed", "0", "--non_verbose", "1", "--no_figures"]), logger=logger)
    logged = [(k, s, v) for k, v, _, s in logger.record["metrics"]]
    terminal = {s: v for k, s, v in logged if k == "terminal_test_acc"}
    summary = [(s, v) for k, s, v in logged if k == "terminal_test_acc_last_10pct"]
    assert summary == [(20, pytest.approx((terminal[19] + terminal[20]) / 2))]  # once, over the last 2 of 20
