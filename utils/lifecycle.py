"""The events every component of a continual-learning run receives, in the order the task loop sends them.

The model, each plasticity method and the buffer's policy subclass `Hooks` and override the events they
act on; the defaults do nothing. The framework's own bookkeeping (the buffer's re-selection, the step
counts the checks rely on, the hidden-unit statistics) runs around these calls, in the task loop's
dispatcher, so an override adds behaviour and never has to call `super()`:

| event | when | typical use |
|---|---|---|
| `begin_task(task)` | before the task's first batch | copy the network, reset a head, warm up |
| `after_backward(task)` | after `loss.backward()`, before the optimizer step | edit gradients, add a penalty's |
| `after_step(batch)` | after every optimizer step | EMA updates, path integrals, resets, records |
| `end_task(task)` | after the task's last batch, before evaluation | importance weights, exemplars, consolidation |
| `end_run()` | after the last task | release resources, final records |
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

class OutputsNotRequested(RuntimeError):
    pass


@dataclass
class StepBatch:
    """The stream batch of one optimizer step.

    `inputs` are the augmented images the model was given, `not_aug_inputs` the stored uint8 images,
    `indices` their dataset rows, `loss` the scalar the step minimised, `step` the run's step count
    (0-based). `logits` are the network's outputs on the stream batch before the step: the rows of the
    first forward pass the model made on it in `observe`, or, for a model that made none, an eval-mode
    forward pass right after `observe`. They are computed only when some component declares
    `NEEDS_OUTPUTS = True`; reading them otherwise is an error, not a silent None.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    not_aug_inputs: torch.Tensor
    indices: torch.Tensor
    task: int
    step: int
    loss: torch.Tensor | None = None
    _logits: torch.Tensor | None = field(default=None, repr=False)
    _outputs_requested: bool = field(default=False, repr=False)

    @property
    def logits(self) -> torch.Tensor:
        if not self._outputs_requested:
            raise OutputsNotRequested("a component read the stream batch's logits without declaring "
                                      "NEEDS_OUTPUTS = True on its class; declare it so the task loop records them")
        return self._logits

    @property
    def example_loss(self) -> torch.Tensor:
        """Cross-entropy of each stream example under `logits` (no gradient)."""
        return F.cross_entropy(self.logits.detach().float(), self.labels, reduction="none")


class Hooks:
    """Base of every component that takes part in a run: each event is a no-op until overridden."""

    NEEDS_OUTPUTS = False  # True: after_step's batch carries the stream batch's logits and per-example loss

    def begin_task(self, task: int) -> None:
        """Before the first batch of `task`."""

    def after_backward(self, task: int) -> None:
        """Between the backward pass and the optimizer step (gradients are in `.grad`)."""

    def after_step(self, batch: StepBatch) -> None:
        """After every optimizer step, with the step's stream batch."""

    def end_task(self, task: int) -> None:
        """After the last batch of `task`, before it is evaluated."""

    def end_run(self) -> None:
        """After the last task."""


@dataclass
class Offered:
    """Rows offered to a replay buffer: what a policy's `insert` chooses among.

    `logits` and `loss` are the network's eval-mode outputs on the offered (unaugmented) examples and their
    per-example cross-entropy at the moment of insertion, computed on first use only.
    """

    examples: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor | None
    scorer: Callable[[torch.Tensor], torch.Tensor] | None = None
    _logits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            if self.scorer is None:
                raise RuntimeError("this buffer has no network to score offered examples with; the model "
                                   "that owns the buffer sets it")
            self._logits = self.scorer(self.examples)
        return self._logits

    @property
    def loss(self) -> torch.Tensor:
        return F.cross_entropy(self.logits.float(), self.labels.to(self.logits.device), reduction="none")
