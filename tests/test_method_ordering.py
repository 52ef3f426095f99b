"""The methods the class-IL literature compares land on seq-digits where it puts them: regularisation methods
(lwf, ewc_on, si) beside fine-tuning, replay methods far above them, joint training on top. The groups name
the methods of those tables; a method added later is held to the contract tests, not to this ordering."""
from __future__ import annotations

import numpy as np
import pytest

from continual.args import parse_args
from continual.run import run
from models import MODELS
from utils.mlflow_logger import RecordingLogger

REGULARISATION = ("sgd", "lwf", "ewc_on", "si")
REPLAY = ("er", "der", "derpp", "er_ace", "xder", "icarl", "bic", "gdumb", "maer")


def class_il(name: str) -> float:
    """Final class-IL accuracy (%) of one short run: 5 epochs per task, lr 0.1, buffer 200, seed 1."""
    model = MODELS.get(name)
    extra = ["--buffer_size", "200"] if model.USES_BUFFER else []
    epochs = ["--n_epochs", "1", "--fitting_epochs", "64"] if name == "gdumb" else ["--n_epochs", "5"]
    args = parse_args(["--model", name, "--lr", "0.1", "--seed", "1", "--non_verbose", "--num_threads", "1",
                       *epochs, *extra])
    state = run(args, logger=RecordingLogger(run_id=name))
    return float(np.mean(state.matrices["class_il"][-1]))


@pytest.mark.slow
def test_class_il_ordering_of_every_method_matches_the_literature():
    accuracy = {name: class_il(name) for name in REGULARISATION + REPLAY + ("agem", "joint")}
    regularisation = [accuracy[n] for n in REGULARISATION]
    replay = [accuracy[n] for n in REPLAY]
    # regularisation without replay forgets in class-IL as fine-tuning does (DER paper, Table 2: within 2 points)
    assert max(regularisation) - min(regularisation) <= 5, accuracy
    # every replay method keeps old classes that no regularisation method keeps, and by far on average
    assert min(replay) >= max(regularisation) + 10, accuracy
    assert np.mean(replay) >= np.mean(regularisation) + 40, accuracy
    # A-GEM's projection keeps little in class-IL (DER paper: seq-mnist 38, seq-cifar10 20 against SGD's 20)
    assert accuracy["agem"] >= accuracy["sgd"], accuracy
    # joint training on every seen task is the upper bound
    assert accuracy["joint"] >= max(accuracy.values()) - 2, accuracy
