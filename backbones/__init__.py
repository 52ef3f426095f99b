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
    (1 for [B, n] and [B, C, H, W]; -1 for ViT tokens [B, T, n]). An activation that gives each unit
    several outputs lays them out as `activation_copies` blocks of n along that axis (CReLU: relu(h),
    then relu(−h)); a weight in `outgoing` then reads unit i at i, i + n, ... (its axis has
    copies × n entries), the unit's activity is the sum of its blocks' |values|, and it fires when any
    of them is > 0.
    """

    name: str
    n_units: int
    incoming: list[tuple[nn.Parameter, int]]
    outgoing: list[tuple[nn.Parameter, int]]
    activation: nn.Module
    activation_axis: int = 1
    activation_copies: int = 1


class Backbone(nn.Module):
    """Base class: constructor (args, input_shape, n_classes), `hidden_units()`, `add_args`.

    A backbone initialised otherwise than by PyTorch's `reset_parameters` states its rule in
    `init_module_`; `reinitialize_` is the base's alone (a subclass that overrides it is refused), so
    every re-draw covers every parameterised module, head included, and checks that it did.
    """

    NAME: str

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "reinitialize_" in vars(cls):
            raise TypeError(f"{cls.__name__} overrides reinitialize_; state its initialisation in init_module_ "
                            f"instead, so that every parameterised module is still re-drawn and checked")

    @staticmethod
    def add_args(parser: argparse._ArgumentGroup) -> None:
        """Backbone-specific flags (none by default)."""

    @staticmethod
    def check_args(args: argparse.Namespace) -> None:
        """Refuse, with one sentence (ConfigError), values a range cannot express (conditions across flags, limits
        that depend on the dataset); a flag's own range is declared in BOUNDS and checked before this."""

    def hidden_units(self) -> list[UnitGroup]:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, the input of the classifier head."""
        raise NotImplementedError

    def attention_modules(self) -> list[nn.Module]:
        """The self-attention modules whose attention maps covariates measure (none outside ViTs)."""
        return []

    def init_module_(self, module: nn.Module) -> bool:
        """Draw `module`'s own parameters (not its children's) by this backbone's rule; True when it did.

        Called (without gradients) by `reinitialize_` for every module holding parameters or buffers of
        its own. The default has no rule: each module then gets its `reset_parameters` (PyTorch's
        initialisation). A backbone initialised otherwise (mlp's Xavier, vit's timm scheme) overrides
        this and returns False for the modules it leaves to `reset_parameters`.
        """
        return False

    @torch.no_grad()
    def reinitialize_(self, modules: list[nn.Module] | None = None) -> None:
        """Draw the parameters of `modules` and of all their submodules (default: the whole network, head
        included) afresh from the initialisation.

        Resets and Shrink & Perturb call this on a scratch copy of the network and take the values they
        need from it. Every module holding parameters or buffers of its own, in `modules()` order, gets
        `init_module_`'s rule or else its `reset_parameters`: random weights are drawn anew, norm scales
        and shifts return to 1 and 0, BatchNorm running statistics restart. A module with parameters
        that neither covers, or a parameter the drawing left unwritten, is refused (RuntimeError naming
        it): a head swapped in by a model, say, can never silently keep its old values.
        """
        roots = [self] if modules is None else modules
        for module in dict.fromkeys(m for root in roots for m in root.modules()):
            own = list(module.named_parameters(recurse=False))
            if not own and next(module.buffers(recurse=False), None) is None:
                continue
            versions = [p._version for _, p in own]  # every in-place write to a parameter bumps its version
            if not self.init_module_(module):
                reset = getattr(module, "reset_parameters", None)
                if reset is None:
                    if own:
                        raise RuntimeError(
                            f"{type(self).__name__}.reinitialize_ cannot re-draw {self._path(module)} "
                            f"({type(module).__name__}): it has parameters but no reset_parameters, and "
                            f"{type(self).__name__}.init_module_ has no rule for it; add one of the two")
                    continue
                reset()
            missed = [name for (name, p), version in zip(own, versions) if p._version == version]
            if missed:
                raise RuntimeError(
                    f"{type(self).__name__}.reinitialize_ left {', '.join(missed)} of {self._path(module)} "
                    f"({type(module).__name__}) unwritten; its initialisation must draw every parameter of "
                    f"the module in place (under no_grad, not through .data)")

    def _path(self, module: nn.Module) -> str:
        """The module's name within the network, for error messages."""
        name = next((name for name, m in self.named_modules() if m is module), None)
        return "the network itself" if name == "" else name or f"a {type(module).__name__} outside the network"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# Backbone flags added after runs, checkpoints and subset-training stores were made, with the value those were made
# with: a record without such a flag is read as having it at this value (a checkpoint resumes, a plan keeps its hash).
FLAGS_ADDED = {"mlp_norm": "none", "mlp_activation": "relu"}

BACKBONES: Registry[Backbone] = Registry("backbone", "backbones")
register_backbone = BACKBONES.register
