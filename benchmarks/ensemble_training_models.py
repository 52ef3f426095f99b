"""The ways of building an ensemble that benchmarks/ensemble_training.py times, and one training step.

The engine trains the `mlp` backbone through `StackedMLP` (weights [K, in, out], one `baddbmm` per
layer, chosen by `memorization.training.build_ensemble`) and every other backbone through the vmapped
`Ensemble`. `vmapped_ensemble` makes train_group take the vmapped path for the MLP too, inside the
block only, so that the benchmark times both paths on the same models; `WAYS` names each vectorised
way with its builder and the context train_group builds it in, and `train_step` is one step of
train_group on fixed inputs, optionally through torch.compile.
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch

from memorization import training as split_training
from memorization.training import autocast


@contextlib.contextmanager
def vmapped_ensemble():
    """Inside the block train_group builds the vmapped `Ensemble` for every backbone, the MLP included
    (the path the engine took for it before `StackedMLP`); the engine's own choice comes back on exit."""
    engine = split_training.build_ensemble
    split_training.build_ensemble = split_training.Ensemble
    try:
        yield
    finally:
        split_training.build_ensemble = engine


class Way(NamedTuple):
    build: Callable  # (nets, training) → ensemble, for the step costs
    context: Callable  # () → the context manager inside which train_group builds the ensemble this way


WAYS = {
    "engine": Way(lambda nets, training: split_training.build_ensemble(nets, training), contextlib.nullcontext),
    "vmapped": Way(lambda nets, training: split_training.Ensemble(nets, training), vmapped_ensemble),
}
LABELS = {"engine": "engine (stacked)", "vmapped": "vmapped Ensemble (forced)"}


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
