"""Plasticity methods, one file each, registered by their CLI name (`l2`, `l2init`, `cbp`, `redo`, ...).

`--plasticity snr_v2,l2` composes methods on top of any model: regularizers add the gradient of their
penalty before the optimizer step; reset methods act after each optimizer step through the network's
hidden-unit groups (`plasticity/_hidden_units.py`), so one reset serves MLP units, conv channels and
ViT MLP units. The contract lives here: a new method is one file that subclasses `PlasticityMethod`,
overrides the events it acts on (`after_backward` for gradient terms, `after_step` for resets,
`begin_task` / `end_task` at task boundaries; see utils/lifecycle.py) and is decorated with
`@register_plasticity("name")`. The task loop sends every event to every method itself, and a
method's attributes are saved in checkpoints without code of its own (utils/state.py).
"""
from __future__ import annotations

import argparse

import torch

from backbones import Backbone
from plasticity._hidden_units import HiddenUnits
from utils.errors import ConfigError
from utils.lifecycle import Hooks, StepBatch
from utils.registry import Registry, method_names  # noqa: F401 (method_names: part of this family's interface)
from utils.state import capture, restore


class PlasticityMethod(Hooks):
    """Base of every method; its flags are declared in `add_args`, their ranges in `BOUNDS`, the rest checked in
    `check_args`.

    `self.net`, `self.optimizer`, `self.units` (the hidden units, for methods with NEEDS_UNITS) and
    `self.args` are the framework's; every other attribute is the method's state and is checkpointed.
    """

    NAME: str
    NEEDS_UNITS = False  # True for methods that act on hidden units (resets)
    REFERENCES = ("net", "optimizer", "units", "args")  # the framework's objects, rebuilt on resume

    @staticmethod
    def add_args(parser: argparse._ArgumentGroup) -> None:
        """Method-specific flags with their published defaults."""

    @staticmethod
    def check_args(args: argparse.Namespace) -> None:
        """Refuse, with one sentence (ConfigError), values a range cannot express (conditions across flags, limits
        that depend on the dataset); a flag's own range is declared in BOUNDS and checked before this."""

    def __init__(self, net: Backbone, optimizer: torch.optim.Optimizer, units: HiddenUnits | None,
                 args: argparse.Namespace):
        self.net = net
        self.optimizer = optimizer
        self.units = units
        self.args = args

    def after_backward(self, task: int) -> None:
        """Between the backward pass and the optimizer step: regularizers add their gradient."""

    def after_step(self, batch: StepBatch) -> None:
        """After every optimizer step, once the step's unit statistics are in (`batch.step` counts steps)."""

    def task_metrics(self, task: int) -> dict[str, float]:
        """Method-specific numbers logged after each task."""
        return {}

    def state_dict(self) -> dict:
        return capture(self)

    def load_state_dict(self, state: dict) -> None:
        restore(self, state, next(self.net.parameters()).device)


PLASTICITY: Registry[PlasticityMethod] = Registry("plasticity method", "plasticity")
register_plasticity = PLASTICITY.register


class Plasticity:
    """The methods of `--plasticity`, composed, plus the hidden-unit machinery they and covariates share."""

    def __init__(self, net: Backbone, optimizer: torch.optim.Optimizer, args: argparse.Namespace):
        classes = [PLASTICITY.get(name) for name in method_names(getattr(args, "plasticity", None))]
        needs_units = any(c.NEEDS_UNITS for c in classes) or getattr(args, "covariates", False)
        self.units = None
        if needs_units:
            self.units = HiddenUnits(net, optimizer)
            if not self.units.groups:
                raise ConfigError(f"the {args.backbone} backbone lists no hidden units, which "
                                  f"{', '.join(c.NAME for c in classes if c.NEEDS_UNITS) or '--covariates'} "
                                  f"needs; use a backbone with hidden-unit groups (mlp, resnet18, vit)")
        self.methods = [c(net, optimizer, self.units, args) for c in classes]
        # the parameters at initialisation, for the covariates' distance from initialisation
        self.initial = [p.detach().clone() for p in net.parameters()] if getattr(args, "covariates", False) else None
        self.step = 0
        self._step_at_task_start = 0

    def mark_task_start(self) -> None:
        self._step_at_task_start = self.step

    def check_stepped(self, task: int, model: str) -> None:
        """A task that ran no optimizer step through these hooks means every method silently did nothing."""
        if self.methods and self.step == self._step_at_task_start:
            raise ConfigError(f"the plasticity methods {', '.join(m.NAME for m in self.methods)} saw no optimizer "
                              f"step in task {task + 1}: {model} trains outside the task loop's step; run it "
                              f"without --plasticity")

    def end_step(self) -> None:
        """The framework's part of a step's end, before the methods' after_step: the step's unit statistics."""
        if self.units is not None:
            self.units.monitor.end_step()

    def after_backward(self, task: int = 0) -> None:
        """The methods' after_backward, for a network trained without a model (models step through their
        Lifecycle, which sends the events to every component)."""
        for method in self.methods:
            method.after_backward(task)

    def after_step(self, batch: StepBatch | None = None) -> None:
        """The end of a step for a network trained without a model: statistics, the methods' after_step."""
        self.end_step()
        batch = batch if batch is not None else StepBatch(None, None, None, None, 0, self.step)
        for method in self.methods:
            method.after_step(batch)
        self.step += 1

    def task_metrics(self, task: int) -> dict[str, float]:
        metrics = {}
        for method in self.methods:
            metrics.update(method.task_metrics(task))
        if self.units is not None:
            resets = self.units.take_resets()
            metrics.update({f"resets/{name}": float(n) for name, n in resets.items()})
            metrics["resets"] = float(sum(resets.values()))
        return metrics

    def state_dict(self) -> dict:
        return {"step": self.step, "methods": [m.state_dict() for m in self.methods],
                "monitor": self.units.monitor.state_dict() if self.units is not None else None,
                "initial": self.initial}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        for method, method_state in zip(self.methods, state["methods"]):
            method.load_state_dict(method_state)
        if self.units is not None and state["monitor"] is not None:
            self.units.monitor.load_state_dict(state["monitor"])
        if self.initial is not None:
            if state.get("initial") is None:
                raise ConfigError("this checkpoint does not hold the network's initial parameters, which "
                                  "--covariates measures the distance from; resume without --covariates or start "
                                  "the run again")
            for kept, saved in zip(self.initial, state["initial"], strict=True):
                kept.copy_(saved)
