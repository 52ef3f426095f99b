"""agem: Averaged Gradient Episodic Memory (A-GEM).

A. Chaudhry, M. Ranzato, M. Rohrbach, M. Elhoseiny, "Efficient Lifelong Learning with A-GEM", ICLR 2019.

The step follows the stream batch's gradient g unless it would increase the loss on the episodic
memory to first order: with g_ref the gradient of the loss on a batch drawn from the memory, a g with
g·g_ref < 0 is replaced by its projection g − (g·g_ref / g_ref·g_ref) g_ref, which has g·g_ref = 0.
The projection runs in `after_backward`, between the task loop's backward pass and its optimizer step.

The memory is filled as in the paper: at the end of each task, --buffer_size // n_tasks examples drawn
at random from the task's training data, unaugmented, are offered to the buffer, so every task keeps an
equal share. Mammoth's agem computes that share but stores one stream batch of each task instead
(--batch_size examples, the first batch of a fresh pass over the task's data): --agem_memory batch. With a memorization
--buffer_policy (min, max, ... and --mem_scores) the policy chooses each task's share instead, from all
of the task's training examples (the replay contract's re-selection in models/__init__.py).
"""
from __future__ import annotations

import torch

from models import ContinualModel, register_model
from models._exemplars import check_task_share
from utils import draws


def project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """A-GEM's update direction: g if g·g_ref ≥ 0, else g − (g·g_ref / ‖g_ref‖²) g_ref (no host sync)."""
    dot = torch.dot(g, g_ref)
    scale = dot.clamp(max=0) / torch.dot(g_ref, g_ref).clamp_min(torch.finfo(g.dtype).tiny)
    return g - scale * g_ref


def flat_gradients(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The parameters' .grad as one vector (zeros for a parameter without a gradient)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def write_gradients(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    """Set each parameter's .grad to its slice of `flat`."""
    offset = 0
    for p in params:
        chunk = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)


def store_from_task(model: ContinualModel, task: int, choose) -> None:
    """Offer the rows `choose(n, device)` of the task's n training examples, unaugmented, to the model's buffer
    with their task label (A-GEM's and GEM's memory); with a memorization --buffer_policy the policy chooses the
    task's share instead, after this (the replay contract's re-selection)."""
    if model.reselects_buffer():
        return
    data = model.training_data(task)
    rows = choose(len(data), data.labels.device)
    indices = data.indices[rows]
    model.buffer.add_data(data.images[rows], data.labels[rows], indices=indices,
                          task_labels=torch.full_like(indices, task))


def random_share(model: ContinualModel):
    """`choose` for store_from_task: a uniform draw of --buffer_size // n_tasks rows."""
    per_task = model.args.buffer_size // model.dataset.n_tasks
    return lambda n, device: torch.randperm(n, device=device)[:per_task]


@register_model("agem")
class AGem(ContinualModel):
    """Stream cross-entropy; the gradient is projected against the memory's in `after_backward`."""

    USES_BUFFER = True

    @staticmethod
    def add_args(parser):
        parser.add_argument("--agem_memory", choices=("share", "batch"), default="share",
                            help="examples each task leaves in memory: --buffer_size // n_tasks (share, the "
                                 "paper) or one stream batch (batch: Mammoth's agem)")

    @classmethod
    def check_args(cls, args):
        super().check_args(args)
        check_task_share(cls.NAME, args)

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        return self.loss(self.net(inputs), labels)

    def reference_gradient(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """g_ref: the gradient of the cross-entropy on a batch drawn from the memory (leaves .grad alone)."""
        replay = self.buffer.get_data(self.args.minibatch_size, transform=self.transform)
        loss = self.loss(self.net(replay["examples"]), replay["labels"])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])

    def after_backward(self, task):
        if self.buffer.is_empty():
            return
        params = [p for p in self.net.parameters() if p.requires_grad]
        g = flat_gradients(params)
        write_gradients(params, project(g, self.reference_gradient(params)))

    @torch.no_grad()
    def end_task(self, task):
        if self.args.agem_memory == "share":
            store_from_task(self, task, random_share(self))
        else:
            store_from_task(self, task,
                            lambda n, device: draws.stream_order(n, device, task, kind="batch")[:self.args.batch_size])
