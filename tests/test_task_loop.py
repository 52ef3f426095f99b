"""The task loop owns the optimizer step: every model's steps reach the plasticity methods, a model edits
gradients between backward and step, and a model that skips the step is refused in one sentence."""
from __future__ import annotations

import math

import pytest
import torch

from backbones import BACKBONES
from continual.args import parse_args
from continual.run import set_seed
from continual.records import RunRecords
from continual.training import RunState, train_task
from datasets import DATASETS
from models import MODELS
from models.sgd import Sgd
from utils.errors import ConfigError
from utils.mlflow_logger import RecordingLogger

EPOCHS = 2
BATCH = 64


def build(model_cls, *flags: str):
    args = parse_args(["--dataset", "seq-digits", "--model", "sgd", "--lr", "0.05", "--seed", "0", "--device", "cpu",
                       "--n_epochs", str(EPOCHS), "--batch_size", str(BATCH), "--non_verbose", *flags])
    set_seed(0)
    dataset = DATASETS.get(args.dataset)(args)
    net = BACKBONES.get(args.backbone)(args, dataset.SHAPE, dataset.N_CLASSES)
    return model_cls(net, dataset, args), dataset, args


def model_args(name: str) -> list[str]:
    extra = {"maer": ["--mem_proxy", "learned_iteration"]}.get(name, [])
    return ["--model", name, *(["--buffer_size", "50"] if MODELS.get(name).USES_BUFFER else []), *extra]


# gdumb makes no step in the loop (it refits a fresh network on its memory at the end of a task) and pnn
# grows a new network per task, so both refuse --plasticity; their own tests cover the refusal.
@pytest.mark.parametrize("name", [n for n in MODELS.names() if n not in ("gdumb", "pnn")])
def test_every_model_steps_through_the_plasticity_hooks(name):
    args = parse_args(["--dataset", "seq-digits", "--lr", "0.05", "--seed", "0", "--device", "cpu",
                       "--n_epochs", str(EPOCHS), "--batch_size", str(BATCH), "--non_verbose",
                       "--plasticity", "l2", *model_args(name)])
    set_seed(0)
    dataset = DATASETS.get(args.dataset)(args)
    net = BACKBONES.get(args.backbone)(args, dataset.SHAPE, dataset.N_CLASSES)
    model = MODELS.get(name)(net, dataset, args)
    state = RunState.fresh(dataset)
    expected = 0
    for task in range(2):
        expected += EPOCHS * math.ceil(len(model.training_data(task)) / BATCH)
        train_task(model, dataset, task, args, RunRecords(RecordingLogger(run_id="x")), state)
    # Every stream step, and every step a method takes itself (lwf's head warm-up), reached the method.
    assert model.plasticity.step == model.lifecycle.counts["plasticity:l2", "after_step"]
    assert model.plasticity.step == model.lifecycle.counts["plasticity:l2", "after_backward"]
    assert model.plasticity.step >= expected
    assert all(math.isfinite(loss) for loss in state.epoch_losses)


class ZeroGradients(Sgd):
    NAME = "zero_gradients"

    def after_backward(self, task):
        self.seen = [p.grad.abs().sum().item() for p in self.net.parameters()]  # after backward
        for p in self.net.parameters():
            p.grad.zero_()


def test_after_backward_runs_between_backward_and_the_step():
    model, dataset, args = build(ZeroGradients)
    before = [p.detach().clone() for p in model.net.parameters()]
    train_task(model, dataset, 0, args, RunRecords(RecordingLogger(run_id="x")), RunState.fresh(dataset))
    assert sum(model.seen) > 0  # the backward pass had written gradients
    for old, new in zip(before, model.net.parameters()):  # plain SGD on zeroed gradients changes nothing
        torch.testing.assert_close(old, new, rtol=0, atol=0)


class DetachedLoss(Sgd):
    NAME = "detached_loss"

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        return super().observe(inputs, labels, not_aug_inputs, indices, task).detach()


def test_a_model_returning_a_detached_loss_is_refused():
    model, dataset, args = build(DetachedLoss)
    with pytest.raises(ConfigError, match=r"detached_loss.observe returned a Tensor without a gradient; return the loss"):
        train_task(model, dataset, 0, args, RunRecords(RecordingLogger(run_id="x")), RunState.fresh(dataset))


class MemoryOnly(Sgd):
    """Stores the stream and never steps inside the loop (as GDumb does until the end of a task)."""

    NAME = "memory_only"

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        self.n_seen = getattr(self, "n_seen", 0) + len(labels)
        return None


def test_a_plasticity_method_that_never_saw_a_step_ends_the_run_in_one_sentence():
    model, dataset, args = build(MemoryOnly, "--plasticity", "redo")
    with pytest.raises(ConfigError, match=r"the plasticity methods redo saw no optimizer step in task 1: memory_only "
                                          r"trains outside the task loop's step; run it without --plasticity"):
        train_task(model, dataset, 0, args, RunRecords(RecordingLogger(run_id="x")), RunState.fresh(dataset))


def test_batches_without_a_step_are_fine_without_plasticity():
    model, dataset, args = build(MemoryOnly)
    before = [p.detach().clone() for p in model.net.parameters()]
    state = RunState.fresh(dataset)
    train_task(model, dataset, 0, args, RunRecords(RecordingLogger(run_id="x")), state)
    assert model.n_seen == EPOCHS * len(dataset.train_split(0))
    assert all(torch.equal(a, b) for a, b in zip(before, model.net.parameters()))
    assert len(state.epoch_losses) == EPOCHS and all(math.isnan(v) for v in state.epoch_losses)
