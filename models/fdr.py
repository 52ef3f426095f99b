"""fdr: Function Distance Regularization (FDR).

A. S. Benjamin, D. Rolnick, K. P. Kording, "Measuring and regularizing networks in function space",
ICLR 2019.

A buffer keeps examples of earlier tasks with the network's softmax outputs on them when they were stored;
training keeps the network's function close to those outputs there. As in Mammoth's fdr, each stream batch
makes two optimizer steps: one on its cross-entropy, then (once the buffer holds examples) one on
--alpha · mean_i ‖softmax(f(x_i)) − softmax(z_i)‖₂ over a buffer batch of --minibatch_size (x_i augmented
as the stream is, z_i the stored logits). The second step's loss is the one the task loop records.

The buffer is filled at the end of each task, not from the stream: with T tasks seen, each keeps
--buffer_size // T examples, the earlier tasks their first ones in buffer order and the new task a
uniform draw of its training examples (Mammoth's first examples of its shuffled loader), stored unaugmented
with the network's logits on them, in evaluation mode. With a memorization --buffer_policy (min, max, ...)
the policy chooses each task's share instead, from all of its training examples (the re-selection in
models/__init__.py stores the logits of the network at that moment as well).

Where this differs from Mammoth (commit e75a491): Mammoth's end_task divides --buffer_size by its task
counter, which counts from 0 and is increased only after end_task, so after the second task both tasks keep
a whole buffer's worth and the reservoir replaces at random; here the share is --buffer_size // T, as in
Mammoth's original fdr and the paper. Mammoth records the logits on the augmented view in training mode;
here they are the evaluation-mode outputs on the stored example (the same for an unaugmented dataset
and a network without BatchNorm or dropout). Mammoth requires --alpha and leaves it unused; here it weighs
the distance (the paper's regularisation strength), and its default 1.0 is Mammoth's.
"""
from __future__ import annotations

import torch

from models import ContinualModel, register_model
from models._exemplars import check_task_share


def function_distance(outputs: torch.Tensor, stored_logits: torch.Tensor) -> torch.Tensor:
    """Mean over examples of the L2 distance between the softmax of `outputs` and that of the stored logits."""
    return torch.linalg.vector_norm(outputs.softmax(1) - stored_logits.softmax(1), ord=2, dim=1).mean()


@register_model("fdr")
class Fdr(ContinualModel):
    """A cross-entropy step, then a step on the function distance over a buffer batch."""

    USES_BUFFER = True
    BOUNDS = {"alpha": "[0, inf)"}

    @staticmethod
    def add_args(parser):
        parser.add_argument("--alpha", type=float, default=1.0,
                            help="fdr: weight of the function distance on the buffer (Mammoth's best seq-cifar10 "
                                 "value, 1.0)")

    @classmethod
    def check_args(cls, args):
        check_task_share(cls.NAME, args)

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        loss = self.loss(self.net(inputs), labels)
        if self.buffer.is_empty():
            return loss
        self.optimizer_step(loss)
        replay = self.buffer.get_data(self.args.minibatch_size, transform=self.transform)
        return self.args.alpha * function_distance(self.net(replay["examples"]), replay["logits"])

    @torch.no_grad()
    def end_task(self, task):
        data = self.training_data(task)
        if self.buffer.examples is None and len(data):  # the stored logits' field, before any policy writes
            first = slice(0, 1)
            self.buffer.allocate({"examples": data.images[first], "labels": data.labels[first],
                                  "logits": self.eval_logits(data.images[first]),
                                  "task_labels": data.indices[first], "indices": data.indices[first]})
        if self.reselects_buffer():
            return  # the --buffer_policy chooses the task's share after this
        per_task = self.args.buffer_size // (task + 1)
        held = self.buffer.get_all()
        kept = [torch.nonzero(held["task_labels"] == t).flatten()[:per_task]
                for t in held["task_labels"].unique().tolist()] if held else []
        self.buffer.keep_first(self.buffer.write_rows(0, held, torch.cat(kept)) if kept else 0)
        rows = torch.randperm(len(data), device=data.labels.device)[:per_task]
        images = data.images[rows]
        self.buffer.add_data(images, data.labels[rows], logits=self.eval_logits(images),
                             task_labels=torch.full_like(data.indices[rows], task), indices=data.indices[rows])
