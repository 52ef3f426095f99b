"""Networks, one file per family, registered by their CLI name (`mlp`, `resnet18`, `vit`, ...).

Every backbone maps float images [B, C, H, W] to logits over all classes of the dataset (one
head; task-IL is done by masking) and lists its hidden units as `UnitGroup`s, so plasticity
methods (resets, dormancy statistics) work on any backbone through one implementation.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from utils.registry import Registry


@dataclass
class UnitGroup:
    """A layer's hidden units: where each unit's incoming and outgoing weights and activation are.

    `incoming` lists (parameter, axis): slice i along the axis belongs to unit i (weight rows,
    conv output channels, biases, norm scales). `outgoing` lists the next layer's parameters with
    the axis that reads unit i (weight columns, conv input channels). `activation` is the module
    whose forward output holds the units' activations, with units along `activation_axis`
    (1 for [B, n] and [B, C, H, W]; -1 for ViT tokens [B, T, n]).
    """

    name: str
    n_units: int
    incoming: list[tuple[nn.Parameter, int]]
    outgoing: list[tuple[nn.Parameter, int]]
    activation: nn.Module
    activation_axis: int = 1


class Backbone(nn.Module):
    """Base class: constructor (args, input_shape, n_classes), `hidden_units()`, `add_args`."""

    NAME: str

    @staticmethod
    def add_args(parser: argparse._ArgumentGroup) -> None:
        """Backbone-specific flags (none by default)."""

    @staticmethod
    def check_args(args: argparse.Namespace) -> None:
        """Refuse out-of-range values of its flags with one sentence (ConfigError); none by default."""

    def hidden_units(self) -> list[UnitGroup]:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, the input of the classifier head."""
        raise NotImplementedError

    def attention_modules(self) -> list[nn.Module]:
        """The self-attention modules whose attention maps covariates measure (none outside ViTs)."""
        return []

    @torch.no_grad()
    def reinitialize_(self, modules: list[nn.Module] | None = None) -> None:
        """Draw the parameters of `modules` (default: the whole network) afresh from the initialisation.

        Resets and Shrink & Perturb call this on a scratch copy of the network and take the values
        they need from it. The default is each module's `reset_parameters` (PyTorch's initialisation,
        used by the resnet backbones); a backbone initialised otherwise (mlp, vit) overrides it.
        """
        for module in self.modules() if modules is None else modules:
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


BACKBONES: Registry[Backbone] = Registry("backbone", "backbones")
register_backbone = BACKBONES.register
