"""Continual-learning methods, one file each, registered by their CLI name (`sgd`, `er`, `derpp`, ...).

The contract every method fulfils lives here. A method is a `ContinualModel` subclass whose
`observe` returns the loss of one stream batch; the task loop runs the backward pass, the events of
every component (utils/lifecycle.py: `begin_task`, `after_backward`, `after_step`, `end_task`,
`end_run`) and the optimizer step, through the `Lifecycle` dispatcher below, so no method can skip
them. A new method is one file: subclass `ContinualModel`, implement `observe`, override the events
it needs, declare its flags in `add_args`, and decorate it with `@register_model("name")`.

The framework's bookkeeping runs in the dispatcher, around the components' events, so an override
never calls `super()` for correctness: a replay method that fills `self.buffer` through
`Buffer.add_data` gets the memorization buffer policies (--buffer_policy min, max, ...): at the
start of a task the earlier classes shrink to their new quotas, and after the model's `end_task` the
task's share is re-selected from all of its training examples by `memorization_values()`.

Checkpoints hold everything a model owns (its networks, including copies made during the run, its
optimizers, tensors, numbers, generators, the buffer and its policy, the plasticity methods) without
code of its own: see utils/state.py for what an attribute may hold.
"""
from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from buffer_policies import BUFFER_POLICIES, Buffer
from datasets import ContinualDataset, Split
from plasticity import Plasticity
from utils.errors import ConfigError
from utils.lifecycle import Hooks, StepBatch
from utils.optimizers import build_optimizer
from utils.registry import Registry
from utils.state import capture, restore


class ContinualModel(nn.Module, Hooks):
    """Base of every method: `observe` one batch; optional `begin_task` / `end_task` / `training_data`.

    A subclass with USES_BUFFER = True gets `self.buffer`, filled through the --buffer_policy; with a
    memorization policy (min, max, ...) it selects by `memorization_values()`, the --mem_scores. A
    subclass with MEMORIZATION_VALUES = True computes values of its own (maer's online --mem_proxy),
    so it may run a memorization policy without --mem_scores, and its check_args checks its source.
    """

    NAME: str
    USES_BUFFER = False
    MEMORIZATION_VALUES = False
    # The framework's objects, rebuilt when a run resumes rather than read from the checkpoint.
    REFERENCES = ("dataset", "args", "lifecycle")

    @staticmethod
    def add_args(parser: argparse._ArgumentGroup) -> None:
        """Method-specific flags (none by default)."""

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Refuse, with one sentence, flags this method cannot run with (called before anything is built, after
        `check_framework_args` and the ranges in BOUNDS, so an override need not call the base's)."""

    @classmethod
    def check_framework_args(cls, args: argparse.Namespace) -> None:
        """What the framework needs of every model, checked whatever `check_args` a method defines."""
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
            self.buffer = Buffer(args.buffer_size, self.device, policy, scorer=self.eval_logits)
        self.selection: dict = {}  # the last end-of-task re-selection of the buffer, for task_record
        self.lifecycle = Lifecycle(self)

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

    def optimizer_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer | None = None,
                       batch: StepBatch | None = None) -> None:
        """One optimizer step on `loss` with every component's events around it. The task loop steps the
        stream batches; a method that trains more (a warm-up in begin_task) steps through here too, with
        its own optimizer, so the plasticity methods and the model's own events see those steps."""
        self.lifecycle.step(loss, optimizer or self.opt, batch)

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
        self.buffer.policy.reselect(self.buffer, task, self.classes_of_tasks(task), candidates, values)
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
        "histograms": {file: (all values, kept values)}}; the loop logs the metrics in the `model/` section and
        file names count tasks from 1. After a memorization re-selection: the dataset indices the buffer holds,
        its count per class, the undefined values, the values' histogram."""
        record = {"metrics": {}, "arrays": {}, "histograms": {}}
        if self.selection.get("task") == task:
            kept = self.selection["kept"]
            record["arrays"][f"buffer/indices_task_{task + 1}.npy"] = kept["indices"]
            classes, counts = np.unique(kept["labels"], return_counts=True)
            record["metrics"].update({f"buffer_count_class_{c}": int(n) for c, n in zip(classes, counts)})
            record["metrics"]["mem_values_undefined"] = self.selection["undefined"]
            record["histograms"][f"buffer/values_task_{task + 1}.png"] = (self.selection["task_values"],
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

    def checkpoint_state(self) -> dict:
        """Everything the model owns: its networks (and copies made during the run), optimizers, buffer,
        policy, plasticity methods and every other attribute (utils/state.py)."""
        return capture(self)

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore `checkpoint_state`'s data into this freshly built model. A network the run made later (a
        teacher, the previous task's network) is rebuilt as a copy of `self.net` when its weights fit."""
        net_keys = set(self.net.state_dict())

        def rebuild(name: str) -> nn.Module | None:
            saved = state["modules"][name]["state"]
            return copy.deepcopy(self.net) if set(saved) == net_keys else None

        restore(self, state, self.device, rebuild)


class Lifecycle:
    """Sends the run's events to the model, each plasticity method and the buffer's policy, with the
    framework's bookkeeping around them, and counts what each component received.

    Order within an event: at the start of a task the framework shrinks a memorization buffer, then the
    plasticity methods, the policy and the model act (so a head reset precedes a model's warm-up); after
    the backward pass the model edits gradients before the regularizers add theirs; after a step the
    model, then the hidden-unit statistics, the plasticity methods (resets) and the policy; at the end of
    a task the model, plasticity methods and policy, then the framework re-selects a memorization buffer.
    """

    def __init__(self, model: "ContinualModel"):
        self.model = model
        self.counts: dict[tuple[str, str], int] = {}
        self.batch: StepBatch | None = None  # the stream batch under way (set by observe)

    def components(self) -> list[tuple[str, Hooks]]:
        model = self.model
        listed = [(f"plasticity:{m.NAME}", m) for m in model.plasticity.methods]
        if model.buffer is not None:
            listed.append((f"policy:{model.buffer.policy.NAME}", model.buffer.policy))
        return listed

    def needs_outputs(self) -> bool:
        return any(c.NEEDS_OUTPUTS for _, c in [("model", self.model), *self.components()])

    def _send(self, event: str, argument, model_first: bool) -> None:
        others = self.components()
        ordered = [("model", self.model), *others] if model_first else [*others, ("model", self.model)]
        for label, component in ordered:
            getattr(component, event)(*(() if event == "end_run" else (argument,)))
            self.counts[label, event] = self.counts.get((label, event), 0) + 1

    def begin_task(self, task: int) -> None:
        model = self.model
        model.plasticity.mark_task_start()
        if model.reselects_buffer():
            model.buffer.policy.shrink(model.buffer, task, model.classes_of_tasks(task), model.memorization_values())
        self._send("begin_task", task, model_first=False)

    def observe(self, inputs: torch.Tensor, labels: torch.Tensor, not_aug_inputs: torch.Tensor,
                indices: torch.Tensor, task: int) -> torch.Tensor | None:
        """The model's `observe`, recording the stream batch (and its logits, when a component asks)."""
        model = self.model
        batch = StepBatch(inputs, labels, not_aug_inputs, indices, task, model.plasticity.step)
        self.batch = batch
        if not self.needs_outputs():
            return model.observe(inputs, labels, not_aug_inputs, indices, task)
        batch._outputs_requested = True
        capture = _OutputCapture(model.net, batch)
        try:
            loss = model.observe(inputs, labels, not_aug_inputs, indices, task)
        finally:
            capture.remove()
        if batch._logits is None:  # the model made no forward pass on the stream batch
            batch._logits = self._eval_outputs(inputs)
        return loss

    @torch.no_grad()
    def _eval_outputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """The network's outputs on a batch in eval mode (no BatchNorm update, no dropout), mode restored."""
        net = self.model.net
        was_training = net.training
        net.eval()
        outputs = net(inputs)
        net.train(was_training)
        return outputs

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer | None = None,
             batch: StepBatch | None = None) -> None:
        """Backward, the after_backward events, the optimizer step (the model's optimizer by default), the
        after_step events. `batch` defaults to the stream batch of the last `observe`."""
        model = self.model
        optimizer = optimizer or model.opt
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise ConfigError(f"{model.NAME}.observe returned a {type(loss).__name__} without a gradient; return "
                              f"the loss tensor itself, not loss.detach() or loss.item() (the task loop runs backward "
                              f"and the optimizer step), or None for a batch that makes no step")
        if batch is None:
            batch = self.batch
        if batch is None:
            raise RuntimeError("a step was taken before any batch was observed; call the model through "
                               "model.lifecycle.observe so the step knows its batch")
        if not batch._outputs_requested and self.needs_outputs():  # a step the method makes itself
            batch._outputs_requested = True
            batch._logits = self._eval_outputs(batch.inputs)
        batch.loss = loss.detach()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._send("after_backward", batch.task, model_first=True)
        optimizer.step()
        model.after_step(batch)
        self.counts["model", "after_step"] = self.counts.get(("model", "after_step"), 0) + 1
        model.plasticity.end_step()
        for label, component in self.components():
            component.after_step(batch)
            self.counts[label, "after_step"] = self.counts.get((label, "after_step"), 0) + 1
        model.plasticity.step += 1

    def end_task(self, task: int) -> None:
        model = self.model
        model.plasticity.check_stepped(task, model.NAME)
        self._send("end_task", task, model_first=True)
        if model.reselects_buffer():
            model.select_buffer(task)

    def end_run(self) -> None:
        self._send("end_run", None, model_first=True)


class _OutputCapture:
    """A forward hook that keeps the logits of the first forward pass of `net` whose input begins with the
    stream batch (the batch itself, or the batch with replay examples appended, as ER concatenates them):
    its first B output rows."""

    def __init__(self, net: nn.Module, batch: StepBatch):
        self.net, self.batch = net, batch
        self.handle = net.register_forward_hook(self.hook)

    def hook(self, module: nn.Module, args: tuple, output) -> None:
        batch = self.batch
        if batch._logits is not None or module is not self.net or not args:
            return
        x, size = args[0], batch.inputs.shape[0]
        if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and output.dim() == 2
                and x.shape[0] >= size and x.shape[1:] == batch.inputs.shape[1:]):
            return
        if x is batch.inputs or torch.equal(x[:size], batch.inputs):
            batch._logits = output[:size].detach()

    def remove(self) -> None:
        self.handle.remove()


MODELS: Registry[ContinualModel] = Registry("model", "models")
register_model = MODELS.register
