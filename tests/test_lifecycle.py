"""What a component cannot break: the framework's bookkeeping runs around the events, whatever a subclass
overrides, and the events arrive in the documented order."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from continual.args import parse_args
from continual.records import RunRecords
from continual.training import RunState, train_task
from models import MODELS
from models.er import Er
from plasticity import PLASTICITY, PlasticityMethod
from tests.conftest import build_model
from utils.errors import ConfigError
from utils.lifecycle import OutputsNotRequested
from utils.mlflow_logger import RecordingLogger

N_TRAIN = 1438


class ErOverridingEverything(Er):
    """Overrides every event without calling super(): none of the framework's work may depend on it."""

    @classmethod
    def check_args(cls, args):
        pass

    def begin_task(self, task):
        self.began = task

    def end_task(self, task):
        self.ended = task


def run_tasks(model, dataset, tasks: int = 2) -> None:
    state = RunState.fresh(dataset)
    for task in range(tasks):
        train_task(model, dataset, task, model.args, RunRecords(RecordingLogger(run_id="x")), state)


@pytest.fixture
def score_file(tmp_path):
    path = tmp_path / "scores.npy"
    np.save(path, ((np.arange(N_TRAIN) * 7919) % N_TRAIN).astype(np.float32))
    return path


def test_overrides_without_super_keep_the_memorization_reselection(monkeypatch, score_file):
    flags = ["--buffer_size", "40", "--buffer_policy", "min", "--mem_scores", str(score_file)]
    plain, dataset = build_model(*flags, model="er")
    monkeypatch.setitem(MODELS._entries, "er", ErOverridingEverything)
    overriding, _ = build_model(*flags, model="er")
    assert isinstance(overriding, ErOverridingEverything)
    for model in (plain, overriding):
        model.dataset.mem_scores = np.load(score_file)  # as main.py's run loads --mem_scores
    run_tasks(plain, dataset)
    run_tasks(overriding, dataset)
    assert overriding.began == 1 and overriding.ended == 1  # the overrides ran
    assert overriding.selection["task"] == 1  # and so did the re-selection they do not call
    assert torch.equal(plain.buffer.indices, overriding.buffer.indices)
    scores = np.load(score_file)
    kept = overriding.buffer.indices.numpy()
    for c in range(4):  # each class keeps its lowest scores (min)
        members = np.flatnonzero(dataset.train.labels.numpy() == c)
        chosen = kept[dataset.train.labels.numpy()[kept] == c]
        assert set(chosen) == set(members[np.argsort(scores[members])][: len(chosen)])


def test_a_check_args_override_without_super_still_refuses_what_the_framework_needs(monkeypatch):
    monkeypatch.setitem(MODELS._entries, "er", ErOverridingEverything)
    with pytest.raises(ConfigError, match="replays from a buffer: pass --buffer_size greater than 0"):
        parse_args(["--model", "er", "--dataset", "seq-digits", "--lr", "0.1", "--buffer_size", "0"])


class Tracer(PlasticityMethod):
    """Records the order of the events it receives, and what the model's head looked like at each."""

    NAME = "tracer"
    NEEDS_OUTPUTS = True

    def __init__(self, net, optimizer, units, args):
        super().__init__(net, optimizer, units, args)
        self.events = []

    def begin_task(self, task):
        self.events.append(("begin_task", task))

    def after_backward(self, task):
        self.events.append(("after_backward", task, all(p.grad is not None for p in self.net.head.parameters())))

    def after_step(self, batch):
        self.events.append(("after_step", batch.step))
        self.last = batch

    def end_task(self, task):
        self.events.append(("end_task", task))


def test_every_event_reaches_a_plasticity_method_in_order_with_the_batch(monkeypatch):
    monkeypatch.setitem(PLASTICITY._entries, "tracer", Tracer)
    model, dataset = build_model("--buffer_size", "40", model="er")
    model.plasticity.methods.append(Tracer(model.net, model.opt, None, model.args))
    (tracer,) = model.plasticity.methods
    run_tasks(model, dataset, tasks=1)
    steps = model.plasticity.step
    assert tracer.events[0] == ("begin_task", 0) and tracer.events[-1] == ("end_task", 0)
    middle = tracer.events[1:-1]
    assert middle == [e for s in range(steps) for e in (("after_backward", 0, True), ("after_step", s))]
    # the batch of the last step: its rows, and the logits of the model's own forward pass on them
    batch = tracer.last
    assert batch.logits.shape == (len(batch.labels), dataset.N_CLASSES) and batch.loss.ndim == 0
    torch.testing.assert_close(batch.example_loss,
                               torch.nn.functional.cross_entropy(batch.logits, batch.labels, reduction="none"))
    assert torch.equal(dataset.train.labels[batch.indices], batch.labels)


def test_reading_the_logits_without_declaring_the_need_is_an_error():
    model, dataset = build_model("--buffer_size", "40", model="er")
    split = dataset.train_split(0)
    raw = split.images[:8]
    loss = model.lifecycle.observe(dataset.train_transform(raw), split.labels[:8], raw, split.indices[:8], 0)
    model.lifecycle.step(loss)
    with pytest.raises(OutputsNotRequested, match="NEEDS_OUTPUTS = True"):
        model.lifecycle.batch.logits


def test_lwf_warm_up_steps_reach_the_plasticity_methods():
    model, dataset = build_model("--plasticity", "l2", "--n_epochs", "1", model="lwf")
    run_tasks(model, dataset, tasks=2)
    stream_steps = 2 * -(-len(dataset.train_split(0)) // model.args.batch_size)
    warm_up_steps = -(-len(dataset.train_split(1)) // model.args.batch_size)
    assert model.plasticity.step == stream_steps + warm_up_steps
    assert model.lifecycle.counts["plasticity:l2", "after_backward"] == model.plasticity.step


def test_a_network_made_by_a_method_keeps_its_own_counters_through_a_checkpoint():
    """An EMA copy's settings and counters (timm's ModelEmaV3 keeps its decay as an attribute) come back."""
    import io

    from timm.utils import ModelEmaV3

    model, _ = build_model()
    model.teacher = ModelEmaV3(model.net, decay=0.9)
    model.teacher.decay, model.teacher.updates = 0.5, 7  # changed during the run
    saved = io.BytesIO()
    torch.save(model.checkpoint_state(), saved)
    saved.seek(0)
    restored, _ = build_model()
    restored.teacher = ModelEmaV3(restored.net, decay=0.9)
    restored.load_checkpoint_state(torch.load(saved, weights_only=True))
    assert restored.teacher.decay == 0.5 and restored.teacher.updates == 7
