"""Continual-learning methods, one file each, registered by their CLI name (`sgd`, `er`, `derpp`, ...).

The contract every method fulfils lives here. A method is a `ContinualModel` subclass whose
`observe` returns the loss of one stream batch; the task loop (`continual/training.py`) runs the
backward pass, the model's `edit_gradients`, the plasticity hooks and the optimizer step, so no
method can skip them. A new method is one file: subclass `ContinualModel`, implement `observe`
(and `begin_task` / `end_task` / `edit_gradients` if it needs them), declare its flags in
`add_args`, and decorate it with `@register_model("name")`.

A replay method that fills `self.buffer` through `Buffer.add_data` gets the memorization buffer
policies (--buffer_policy min, max, ...) from this contract: `begin_task` shrinks the earlier classes,
`end_task` re-selects the task's share from all of its training examples by `memorization_values()`
(the --mem_scores) and computes, in eval mode, the logits a DER-style buffer stores for the examples
it now keeps. An override of `begin_task` or `end_task` therefore calls the base's.
"""
from __future__ import annotations

import argparse

import numpy as np
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

    A subclass with USES_BUFFER = True gets `self.buffer`, filled through the --buffer_policy; with a
    memorization policy (min, max, ...) it selects by `memorization_values()`, the --mem_scores. A
    subclass with MEMORIZATION_VALUES = True computes values of its own (maer's online --mem_proxy),
    so it may run a memorization policy without --mem_scores, and its check_args checks its source.
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
        if policy.NEEDS_MEMORIZATION_VALUES and not cls.MEMORIZATION_VALUES and args.mem_scores is None:
            providers = [n for n in MODELS.names() if MODELS.get(n).MEMORIZATION_VALUES]
            raise ConfigError(f"--buffer_policy {args.buffer_policy} re-selects the buffer by memorization values, "
                              f"which {cls.NAME} does not compute; use --model {' or '.join(providers)} (online "
                              f"--mem_proxy) or pass precomputed scores with --mem_scores FILE.npy")

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
        self.selection: dict = {}  # the last end-of-task re-selection of the buffer, for task_record

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
        """Called before the first batch of a task; a memorization buffer policy shrinks the earlier classes
        to their new quotas here (an override calls super().begin_task(task))."""
        if self.reselects_buffer():
            self.buffer.policy.begin_task(self.buffer, task, self.classes_of_tasks(task), self.memorization_values())

    def end_task(self, task: int) -> None:
        """Called after the last batch of a task, before evaluation; a memorization buffer policy re-selects
        the task's share of the buffer here (an override calls super().end_task(task))."""
        if self.reselects_buffer():
            self.select_buffer(task)

    def reselects_buffer(self) -> bool:
        """Whether the buffer's policy re-selects it by memorization values at task boundaries."""
        return self.buffer is not None and self.buffer.policy.NEEDS_MEMORIZATION_VALUES

    def memorization_values(self) -> np.ndarray:
        """A value per training example (dataset order, NaN where undefined) that the memorization buffer
        policies select by: the --mem_scores (maer may compute them online instead)."""
        return self.dataset.mem_scores

    def classes_of_tasks(self, task: int) -> list[range]:
        return [self.dataset.task_classes(t) for t in range(task + 1)]

    @torch.no_grad()
    def eval_logits(self, images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """The network's logits on unaugmented uint8 images, in eval mode (the previous mode is restored)."""
        was_training = self.net.training
        self.net.eval()
        logits = torch.cat([self.net(self.dataset.test_transform(images[i:i + chunk]))
                            for i in range(0, len(images), chunk)])
        self.net.train(was_training)
        return logits

    @torch.no_grad()
    def select_buffer(self, task: int) -> None:
        """Let the memorization policy fill the task's share of the buffer from all of the task's training
        examples, and remember what it kept for task_record."""
        split = self.dataset.train_split(task)
        candidates = {"examples": split.images, "labels": split.labels, "indices": split.indices,
                      "task_labels": torch.full_like(split.indices, task)}
        if self.buffer.logits is not None:  # DER targets for newly chosen examples: the logits now
            candidates["logits"] = self.eval_logits(split.images)
        values = self.memorization_values()
        self.buffer.policy.end_task(self.buffer, task, self.classes_of_tasks(task), candidates, values)
        kept = {k: v.cpu().numpy() for k, v in self.buffer.get_all().items() if k in ("indices", "labels")}
        task_values = values[split.indices.cpu().numpy()]
        self.selection = {"task": task, "kept": kept, "task_values": task_values,
                          "buffer_values": values[kept["indices"]],
                          "undefined": int(np.isnan(task_values).sum())}

    def training_data(self, task: int) -> Split:
        """The examples the model trains on during a task (the task's own split by default)."""
        return self.dataset.train_split(task)

    def task_record(self, task: int) -> dict:
        """What the model wants logged after a task: {"metrics": {...}, "arrays": {file: array},
        "histograms": {file: (all values, kept values)}}. After a memorization re-selection: the dataset
        indices the buffer holds, its count per class, the undefined values, the values' histogram."""
        record = {"metrics": {}, "arrays": {}, "histograms": {}}
        if self.selection.get("task") == task:
            kept = self.selection["kept"]
            record["arrays"][f"buffer/indices_task_{task}.npy"] = kept["indices"]
            classes, counts = np.unique(kept["labels"], return_counts=True)
            record["metrics"].update({f"buffer_count_class_{c}": int(n) for c, n in zip(classes, counts)})
            record["metrics"]["mem_values_undefined"] = self.selection["undefined"]
            record["histograms"][f"buffer/values_task_{task}.png"] = (self.selection["task_values"],
                                                                      self.selection["buffer_values"])
        return record

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
