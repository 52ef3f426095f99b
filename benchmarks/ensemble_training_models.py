"""The reference implementations benchmarks/ensemble_training.py times beside the engine's code.

`StackedMLPEnsemble` is a PROTOTYPE of a faster vectorised MLP ensemble (not the engine's code),
`prototype_ensemble` makes train_group build it, and `train_step` is one step of train_group on fixed
inputs, optionally through torch.compile.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from memorization import training as split_training
from memorization.training import autocast
from utils.optimizers import build_optimizer


class StackedMLPEnsemble:
    """PROTOTYPE of a faster vectorised MLP ensemble; the engine's `Ensemble` is what train_splits.py runs.

    The same parameters (copied from the same initialised networks) and the same optimizer, laid out
    as the engine lays them out in memory (weights [K, in, out]), but each layer is one `baddbmm`
    (bias folded in) followed by a ReLU, without vmap or functional_call: the reference for what a
    vmap-free stacked MLP path in the engine would give.
    """

    def __init__(self, nets: list[torch.nn.Module], training: argparse.Namespace):
        self.size = len(nets)
        linears = [[*net.layers, net.head] for net in nets]  # per network, its Linear layers in order
        self.weights = [torch.stack([layer.weight.detach().t() for layer in same]).contiguous().requires_grad_()
                        for same in zip(*linears)]
        self.biases = [torch.stack([layer.bias.detach()[None] for layer in same]).requires_grad_()
                       for same in zip(*linears)]
        self.parameters = self.weights + self.biases
        self.optimizer = build_optimizer(self.parameters, training)

    def train(self, mode: bool = True) -> None:
        """No dropout or BatchNorm in the MLP: nothing changes between training and evaluation."""

    def __call__(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        h = x.flatten(1).expand(self.size, -1, -1) if shared_input else x.flatten(2)
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(bias, h, weight)
            if i < len(self.weights) - 1:
                h = torch.relu(h)
        return h


@contextlib.contextmanager
def prototype_ensemble():
    """train_group builds StackedMLPEnsemble instead of the engine's Ensemble (for K > 1) inside the block."""
    engine = split_training.Ensemble

    def build(nets, training):
        return engine(nets, training) if len(nets) == 1 else StackedMLPEnsemble(nets, training)

    split_training.Ensemble = build
    try:
        yield
    finally:
        split_training.Ensemble = engine


def train_step(ensemble, x: torch.Tensor, y: torch.Tensor, compiled: bool):
    """One step of train_group on fixed inputs; with `compiled`, the forward and loss (with their backward)
    and the optimizer step each go through torch.compile (compiled at the first call, a warm-up call)."""
    def loss_of():
        with autocast(x.device):
            logits = ensemble(x).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        return loss.view_as(y).mean(1).sum()

    update = ensemble.optimizer.step
    if compiled:
        loss_of, update = torch.compile(loss_of), torch.compile(update)

    def step():
        loss = loss_of()
        ensemble.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        update()
    return step
