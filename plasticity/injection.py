"""injection: plasticity injection (Nikishin, Oh, Ostrovski, Lyle, Pascanu, Dabney, Barreto, "Deep reinforcement
learning with plasticity injection", NeurIPS 2023), as Plasticine lists it among its plasticity methods.

At an injection the output layer h (the backbone's `head`, a linear map of the features z) is frozen and the output
becomes h_frozen(z) + h_new(z) − h_new0(z): h_new is a fresh draw of the backbone's initialisation and trains,
h_new0 is a frozen copy of it. At that moment h_new = h_new0, so the network computes exactly what it computed
before, and from then on only h_new (with the features below the head) learns. Injections happen at the start of
every `--injection_every`-th task (tasks k, 2k, ...; never before the first), before the model's own begin_task.

The head is linear, so a later injection folds the terms injected before into the frozen layer (frozen ← frozen +
new − new0, weights and biases) and draws a new pair: the network keeps three linear layers however many
injections a run makes. The first injection leaves every output bit for bit unchanged; a later one changes them by
the float rounding of the fold (one rounding per weight).

The structure exists from the start, so checkpoints, the optimizer and every method that lists the network's
parameters see one network throughout: the head the backbone built becomes the trainable layer (the optimizer
already holds it, so its moments are cleared at each injection, as when a reset re-draws a unit), and the frozen
layer and the initial copy are zero until the first injection, when the frozen layer takes the trained head's
values. Before the first injection the output is the trainable layer's alone. Gradients reach the features
through all three layers (d output / dz = W_frozen + W_new − W_new0), as autograd gives them for this output.
A reset of a last hidden layer's unit zeroes its column in all three, which removes the unit's contribution.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from plasticity import PlasticityMethod, register_plasticity
from plasticity._hidden_units import clear_optimizer_state
from utils.errors import ConfigError
from utils.registry import method_names

# Methods that move the whole output layer or every parameter, which the frozen layers must not follow.
CONFLICTS = {"head_reset": "restarts the output layer at task boundaries itself",
             "shrink_perturb": "shrinks and perturbs every parameter, the frozen layers too"}


class InjectedHead(nn.Module):
    """frozen(z) + (new(z) − initial(z)), or new(z) alone before the first injection (`injections` counts them).

    `weight` and `bias` are the trainable layer's, so code that reads a linear head's weight (a backbone's hidden
    units, a model's warm-up of the head) finds the layer that learns.
    """

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.new = head
        self.frozen = copy.deepcopy(head).requires_grad_(False)
        self.initial = copy.deepcopy(head).requires_grad_(False)
        with torch.no_grad():
            for param in (*self.frozen.parameters(), *self.initial.parameters()):
                param.zero_()
        self.injections = 0

    @property
    def weight(self) -> nn.Parameter:
        return self.new.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.new.bias

    @property
    def in_features(self) -> int:
        return self.new.in_features

    @property
    def out_features(self) -> int:
        return self.new.out_features

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.injections == 0:
            return self.new(z)
        # The difference first: it is exactly 0 at an injection, so the sum is exactly frozen(z).
        return self.frozen(z) + (self.new(z) - self.initial(z))

    def layer_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, nn.Parameter]]:
        """(frozen, new, initial) for the weight and, where the head has one, the bias."""
        names = [name for name, _ in self.new.named_parameters()]
        return [(self.frozen.get_parameter(n), self.new.get_parameter(n), self.initial.get_parameter(n)) for n in names]


@register_plasticity("injection")
class PlasticityInjection(PlasticityMethod):
    BOUNDS = {"injection_every": "[1, inf)"}  # a number of tasks

    @staticmethod
    def add_args(parser):
        parser.add_argument("--injection_every", type=int, default=1,
                            help="inject at the start of every k-th task (tasks k, 2k, ...; 1: at every task "
                                 "boundary)")

    @staticmethod
    def check_args(args):
        for name in method_names(getattr(args, "plasticity", None)):
            if name in CONFLICTS:
                raise ConfigError(f"--plasticity injection freezes part of the output layer, but {name} "
                                  f"{CONFLICTS[name]}; run injection without {name}")

    def __init__(self, net, optimizer, units, args):
        super().__init__(net, optimizer, units, args)
        head = net.head
        if type(head) is not nn.Linear:
            raise ConfigError(f"--plasticity injection sums linear output layers, but this network's head is a "
                              f"{type(head).__name__}; use a model with a linear head (er_ace: "
                              f"--use_custom_classifier 0)")
        net.head = InjectedHead(head)
        if units is not None:  # a unit read by the head is read by all three of its layers
            extend_outgoing(units.groups, net.head)

    @torch.no_grad()
    def begin_task(self, task):
        if task == 0 or task % self.args.injection_every:
            return
        head: InjectedHead = self.net.head
        for frozen, new, initial in head.layer_pairs():
            if head.injections:
                frozen.add_(new - initial)
            else:
                frozen.copy_(new)
        self.net.reinitialize_([head.new])
        for _, new, initial in head.layer_pairs():
            initial.copy_(new)
            clear_optimizer_state(self.optimizer, new)
        head.injections += 1

    def task_metrics(self, task):
        return {"injections": float(self.net.head.injections)}


def extend_outgoing(groups, head: InjectedHead) -> None:
    """Where a hidden-unit group lists the trainable head's weight as outgoing, add the frozen and initial
    layers' weights along the same axis, so a reset zeroes the unit's columns in all three."""
    for group in groups:
        for param, axis in list(group.outgoing):
            if param is head.new.weight:
                group.outgoing += [(head.frozen.weight, axis), (head.initial.weight, axis)]
