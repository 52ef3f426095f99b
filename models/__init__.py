"""Continual-learning methods, one file each, registered by their CLI name (`sgd`, `er`, `derpp`, ...).

The contract every method fulfils lives here. A method is a `ContinualModel` subclass whose
`observe` returns the loss of one stream batch; the task loop (`continual/training.py`) runs the
backward pass, the model's `edit_gradients`, the plasticity hooks and the optimizer step, so no
method can skip them. A new method is one file: subclass `ContinualModel`, implement `observe`
(and `begin_task` / `end_task` / `edit_gradients` if it needs them), declare its flags in
`add_args`, and decorate it with `@register_model("name")`.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from buffer_policies import BUFFER_POLICIES, Buffer
from datasets import ContinualDataset, Split
from plasticity import Plasticity
from utils.errors import ConfigError
from utils.optimizers import build_optimizer
from utils.registry import Registry


class ContinualModel(nn.Module):
    """Base of every method: `observe` one batch; optional `begin_task` / `end_task` / `training_data`.

    A subclass with USES_BUFFER = True gets `self.buffer`, filled through the --buffer_policy.
    A subclass with MEMORIZATION_VALUES = True provides `memorization_values()`, which the
    memorization buffer policies (min, max, ...) select by.
    """

    NAME: str
    USES_BUFFER = False
    MEMORIZATION_VALUES = False

    @staticmethod
    def add_args(parser: argparse._ArgumentGroup) -> None:
        """Method-specific flags (none by default)."""

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Refuse, with one sentence, flags this method cannot run with (called before anything is built)."""
        if cls.USES_BUFFER and args.buffer_size <= 0:
            raise ConfigError(f"{cls.NAME} replays from a buffer: pass --buffer_size greater than 0")
        if not cls.USES_BUFFER and args.buffer_policy != "reservoir":
            replay = [n for n in MODELS.names() if MODELS.get(n).USES_BUFFER]
            raise ConfigError(f"--buffer_policy {args.buffer_policy} chooses a replay buffer's contents, but "
                              f"{cls.NAME} has no buffer; use a replay model ({', '.join(replay)})")
        policy = BUFFER_POLICIES.get(args.buffer_policy)
        if policy.NEEDS_MEMORIZATION_VALUES and not cls.MEMORIZATION_VALUES:
            providers = [n for n in MODELS.names() if MODELS.get(n).MEMORIZATION_VALUES]
            raise ConfigError(f"--buffer_policy {args.buffer_policy} re-selects the buffer by memorization values, "
                              f"which {cls.NAME} does not compute; use --model {' or '.join(providers)}")

    def __init__(self, backbone: nn.Module, dataset: ContinualDataset, args: argparse.Namespace):
        super().__init__()
        self.net = backbone
        self.dataset = dataset
        self.args = args
        self.device = torch.device(args.device)
        self.loss = nn.CrossEntropyLoss()
        self.opt = build_optimizer(self.net.parameters(), args)
        # --plasticity methods (and the hidden-unit statistics of --covariates): the task loop calls
        # them around every optimizer step.
        self.plasticity = Plasticity(self.net, self.opt, args)
        self.transform = dataset.train_transform
        self.buffer = None
        if self.USES_BUFFER:
            policy = BUFFER_POLICIES.get(args.buffer_policy)(args)
            self.buffer = Buffer(args.buffer_size, self.device, policy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def observe(self, inputs: torch.Tensor, labels: torch.Tensor, not_aug_inputs: torch.Tensor,
                indices: torch.Tensor, task: int) -> torch.Tensor | None:
        """The loss of one stream batch, with its autograd graph (the task loop steps the optimizer),
        or None for a batch that only feeds the model's memory and makes no step.

        A replay method also offers the batch to its buffer here: the batch is stored after the
        replay batch was drawn, so it is never replayed in its own step.
        """
        raise NotImplementedError

    def edit_gradients(self, task: int) -> None:
        """Called between the backward pass and the optimizer step (e.g. A-GEM projects the gradient)."""

    def begin_task(self, task: int) -> None:
        """Called before the first batch of a task."""

    def end_task(self, task: int) -> None:
        """Called after the last batch of a task, before evaluation."""

    def training_data(self, task: int) -> Split:
        """The examples the model trains on during a task (the task's own split by default)."""
        return self.dataset.train_split(task)

    def task_record(self, task: int) -> dict:
        """What the model wants logged after a task: {"metrics": {...}, "arrays": {file: array},
        "histograms": {file: (all values, kept values)}}."""
        return {}

    def replay_logit_loss(self) -> torch.Tensor:
        """DER's term: MSE between the network's logits on a buffer batch and the logits stored with it."""
        replay = self.buffer.get_data(self.args.minibatch_size, transform=self.transform)
        return F.mse_loss(self.net(replay["examples"]), replay["logits"])

    def replay_label_loss(self) -> torch.Tensor:
        """DER++'s second term: cross-entropy on another buffer batch."""
        replay = self.buffer.get_data(self.args.minibatch_size, transform=self.transform)
        return self.loss(self.net(replay["examples"]), replay["labels"])

    def extra_state(self) -> dict:
        """Everything besides the network and optimizer that a checkpoint must restore."""
        state = {"plasticity": self.plasticity.state_dict()}
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        self.plasticity.load_state_dict(state["plasticity"])
        if self.buffer is not None:
            self.buffer.load_state_dict(state["buffer"])


MODELS: Registry[ContinualModel] = Registry("model", "models")
register_model = MODELS.register
