"""Run for run with Mammoth: this program, fed Mammoth's draws, reproduces Mammoth's own runs.

tests/fixtures/mammoth_runs.json holds, per method, the loss of every stream step and the accuracy matrices
(every seen task's class-IL and task-IL accuracy after every task) of Mammoth's main.py (aimagelab/mammoth
at e75a491, torch 2.14.1 on the CPU, two threads) on seq-mnist files written from the first 1000 training
and 200 test images of scikit-learn's digits upsampled to 28x28, seed 0: `benchmarks/mammoth_runs.py
reference` made it with `benchmarks/mammoth_trace.py`. Here main.py runs in this process on the same
files with the same flags, its stream order, reservoir slots and replay batches replaced by Mammoth's
(`benchmarks/mammoth_draws.py`), and must give the same losses step for step and the same matrices.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import mammoth_draws
from benchmarks.mammoth_runs import ours_matrices
from benchmarks.startup import write_digits_as_mnist
from models import MODELS

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "mammoth_runs.json").read_text())


@pytest.fixture(scope="module")
def digits_as_mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    write_digits_as_mnist(root, REFERENCE["n_train"], REFERENCE["n_test"])
    return root


@pytest.mark.parametrize("method", sorted(REFERENCE["methods"]))
def test_a_run_fed_mammoths_draws_is_mammoths_run(method, digits_as_mnist, tmp_path, monkeypatch, capsys):
    import main

    theirs = REFERENCE["methods"][method]
    losses = []
    cls = MODELS.get(theirs["model"])
    observe = cls.observe

    def recorded(self, *args):
        loss = observe(self, *args)
        losses.append(float(loss))
        return loss

    monkeypatch.setattr(cls, "observe", recorded)
    mammoth_draws.install(REFERENCE["seed"], monkeypatch.setattr)
    threads = torch.get_num_threads()
    try:
        code = main.main(["--model", theirs["model"], *REFERENCE["common"], *theirs["flags"], *theirs["ours"],
                          "--seed", str(REFERENCE["seed"]), "--backbone", "mlp", "--mlp_hidden", "100,100",
                          "--data_path", str(digits_as_mnist), "--device", "cpu", "--num_threads", "2",
                          "--non_verbose", "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    assert len(losses) == len(theirs["losses"])
    assert losses == pytest.approx(theirs["losses"], rel=1e-5, abs=1e-7)
    assert ours_matrices(capsys.readouterr().out) == theirs["matrices"]
