"""The ways of building an ensemble that benchmarks/ensemble_training.py times, and one training step.

The engine trains the `mlp` backbone through `StackedMLP` (weights [K, out, in], one `baddbmm` per
layer, the backward pass written out; chosen by `memorization.training.build_ensemble`) and every other
backbone through the vmapped `Ensemble`. `built_as` makes train_group build another way inside a block
only: the vmapped `Ensemble` forced onto the MLP, or `AutogradStackedMLP` (stacked weights with autograd's
backward, the straightforward way), or `TextbookModel` (one `nn.Module` at a time, autograd and torch's optimizer,
the textbook loop), so that the benchmark times every way on the same models; `WAYS`
names each vectorised way with its builder and the context train_group builds it in, and `train_step` is
one step of train_group on fixed inputs, optionally through torch.compile.
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from memorization import training as split_training
from utils.optimizers import build_optimizer


class AutogradStackedMLP:
    """The straightforward stacked MLP: weights [K, in, out], one `baddbmm` per layer with activations
    [K, B, features], autograd's backward and torch's default optimizer (the engine's path before its
    backward was written out and its products turned round)."""

    def __init__(self, nets, training):
        self.size = len(nets)
        layers = [[*net.layers, net.head] for net in nets]
        self.weights = [torch.stack([layer.weight.detach().t() for layer in same]).contiguous().requires_grad_()
                        for same in zip(*layers)]
        self.biases = [torch.stack([layer.bias.detach()[None] for layer in same]).requires_grad_()
                       for same in zip(*layers)]
        self.optimizer = build_optimizer(self.weights + self.biases, training)
        self.smoothing = training.label_smoothing

    def train(self, mode: bool = True) -> None:
        """No dropout or BatchNorm in the mlp."""

    def __call__(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        h = x.flatten(1).expand(self.size, -1, -1) if shared_input else x.flatten(2)
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(bias, h, weight)
            h = torch.relu(h) if i < len(self.weights) - 1 else h
        return h

    train_step = split_training.Ensemble.train_step  # forward, loss, autograd's backward, optimizer step


class TextbookModel:
    """One model trained the textbook way: the `nn.Module`'s own forward, autograd's backward and torch's default
    optimizer, one model at a time (the loop a researcher writes by hand, and what `--ensemble 1` ran before the
    stacked MLP). The ensembles' contract with K = 1: inputs [1, B, ...], logits [1, B, classes]."""

    def __init__(self, nets, training):
        (self.net,) = nets
        self.size = 1
        self.optimizer = build_optimizer(self.net.parameters(), training)
        self.smoothing = training.label_smoothing

    def train(self, mode: bool = True) -> None:
        self.net.train(mode)

    def __call__(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        return self.net(x if shared_input else x[0])[None]

    def train_step(self, x: torch.Tensor, y: torch.Tensor, with_loss: bool = True, correct: torch.Tensor | None = None):
        logits = self.net(x[0])
        loss = F.cross_entropy(logits, y[0], label_smoothing=self.smoothing)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if correct is not None:
            correct[0] = logits.detach().argmax(-1) == y[0]
        return loss.detach(), logits.detach()[None]


@contextlib.contextmanager
def built_as(builder: Callable):
    """Inside the block train_group builds its ensembles with `builder` (nets, training) → ensemble, for the
    MLP too; the engine's own choice comes back on exit."""
    engine = split_training.build_ensemble
    split_training.build_ensemble = builder
    try:
        yield
    finally:
        split_training.build_ensemble = engine


class Way(NamedTuple):
    build: Callable  # (nets, training) → ensemble, for the step costs
    context: Callable  # () → the context manager inside which train_group builds the ensemble this way


WAYS = {
    "engine": Way(lambda nets, training: split_training.build_ensemble(nets, training), contextlib.nullcontext),
    "autograd": Way(AutogradStackedMLP, lambda: built_as(AutogradStackedMLP)),
    "vmapped": Way(split_training.Ensemble, lambda: built_as(split_training.Ensemble)),
}
LABELS = {"engine": "engine (stacked)", "autograd": "stacked with autograd", "vmapped": "vmapped Ensemble (forced)"}


def train_step(ensemble, x: torch.Tensor, y: torch.Tensor, compiled: bool):
    """One step of train_group on fixed inputs (the ensemble's own `train_step`: forward, loss, backward,
    optimizer step); with `compiled`, that step goes through torch.compile (compiled at a warm-up call)."""
    step = ensemble.train_step
    if compiled:
        step = torch.compile(step)
    return lambda: step(x, y)
