"""The model contract: a CL method wraps a backbone and learns from one stream batch at a time."""
from __future__ import annotations

import argparse

import torch
from torch import nn

from buffer_policies import BUFFER_POLICIES
from plasticity import Plasticity
from utils.buffer import Buffer
from utils.continual_dataset import ContinualDataset, Split

OPTIMIZERS = ("sgd", "adam", "adamw")


def build_optimizer(params, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The optimizer named by --optimizer: SGD with --optim_mom, or Adam/AdamW with --optim_eps."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.optim_mom, weight_decay=args.optim_wd)
    cls = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=args.lr, betas=(0.9, 0.999), eps=args.optim_eps, weight_decay=args.optim_wd)


class ContinualModel(nn.Module):
    """Base of every method: `observe` one batch; optional `begin_task` / `end_task` / `training_data`.

    A subclass with USES_BUFFER = True gets `self.buffer`, filled through the --buffer_policy.
    """

    NAME: str
    USES_BUFFER = False

    @staticmethod
    def add_args(parser: argparse._ArgumentGroup) -> None:
        """Method-specific flags (none by default)."""

    def __init__(self, backbone: nn.Module, dataset: ContinualDataset, args: argparse.Namespace):
        super().__init__()
        self.net = backbone
        self.dataset = dataset
        self.args = args
        self.device = torch.device(args.device)
        self.loss = nn.CrossEntropyLoss()
        self.opt = build_optimizer(self.net.parameters(), args)
        # --plasticity methods (and the hidden-unit statistics of --covariates) act around every step.
        self.plasticity = Plasticity(self.net, self.opt, args)
        self.transform = dataset.train_transform
        self.buffer = None
        if self.USES_BUFFER:
            policy = BUFFER_POLICIES.get(args.buffer_policy)(args)
            self.buffer = Buffer(args.buffer_size, self.device, policy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def observe(self, inputs: torch.Tensor, labels: torch.Tensor, not_aug_inputs: torch.Tensor,
                indices: torch.Tensor, task: int) -> torch.Tensor:
        """One optimisation step on a stream batch; returns the detached loss (no device sync)."""
        raise NotImplementedError

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

    def sgd_step(self, loss: torch.Tensor) -> None:
        """Backward, regularizer gradients, optimizer step, then resets and unit statistics."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.plasticity.before_step()
        self.opt.step()
        self.plasticity.after_step()

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
