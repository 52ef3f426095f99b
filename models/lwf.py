"""lwf: Learning without Forgetting.

Z. Li, D. Hoiem, "Learning without Forgetting", ECCV 2016 (TPAMI 2018).

Before a task after the first, as in Mammoth's lwf: the head alone is warmed up on the new task's
classes (--n_epochs epochs of SGD at --lr on the frozen features, cross-entropy over the new classes'
logits), then the network's logits on the task's unaugmented training examples are recorded. Training
then minimises the cross-entropy over the logits of the classes seen so far (class-IL: classes of later
tasks are left out) plus --alpha times the distillation term on the classes of earlier tasks:
KL(softmax(z_old / T) ‖ softmax(z / T)) with T = --softmax_temp, z_old the recorded logits of the
example. Mammoth writes the term as the cross-entropy −Σ softmax(z_old/T) log softmax(z/T), which
differs from the KL divergence by the entropy of the recorded distribution, a constant: the gradients
are the same, and the term here is 0 when the network still gives the recorded logits.

In a domain-IL stream every class is seen from the first task on: there is no head warm-up and the
distillation covers all classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models import ContinualModel, register_model
from utils import draws
from utils.lifecycle import StepBatch

LOGIT_BATCH = 512  # examples per forward pass when recording the logits


@register_model("lwf")
class Lwf(ContinualModel):
    """Cross-entropy on the seen classes plus distillation towards the logits recorded before the task."""

    BOUNDS = {"alpha": "[0, inf)", "softmax_temp": "(0, inf)"}

    @staticmethod
    def add_args(parser):
        parser.add_argument("--alpha", type=float, default=0.5,
                            help="weight of the distillation term towards earlier outputs (lwf: the previous "
                                 "model's softmax at --softmax_temp; Mammoth's lwf default 0.5)")
        parser.add_argument("--softmax_temp", type=float, default=2.0,
                            help="temperature of the distillation softmax (Mammoth's lwf)")

    def __init__(self, backbone, dataset, args):
        super().__init__(backbone, dataset, args)
        self.n_past = 0  # classes of the tasks before the current one
        self.n_seen = dataset.seen_classes(0)  # classes up to the current task
        self.old_logits: torch.Tensor | None = None  # per example of the current task, recorded at begin_task
        self.row_of: torch.Tensor | None = None  # dataset index -> row of old_logits

    def begin_task(self, task):
        self.n_past = self.dataset.seen_classes(task - 1) if task > 0 else 0
        self.n_seen = self.dataset.seen_classes(task)
        self.old_logits = self.row_of = None
        if task == 0:
            return
        data = self.training_data(task)
        was_training = self.net.training
        self.net.eval()
        if self.n_seen > self.n_past:
            self.warm_up_head(data, task)
        with torch.no_grad():
            self.old_logits = torch.cat([self.net(self.dataset.test_transform(data.images[i:i + LOGIT_BATCH]))
                                         for i in range(0, len(data), LOGIT_BATCH)])
        self.row_of = torch.full((len(self.dataset.train),), -1, dtype=torch.long, device=data.indices.device)
        self.row_of[data.indices] = torch.arange(len(data), device=data.indices.device)
        self.net.train(was_training)

    def warm_up_head(self, data, task: int) -> None:
        """Train the head alone on the new classes' logits, the features fixed (Mammoth's lwf warm-up). Its
        steps go through `optimizer_step`, so the plasticity methods and their step counts see them."""
        opt = torch.optim.SGD(self.net.head.parameters(), lr=self.args.lr)
        batch_size = self.args.batch_size
        for _ in range(self.args.n_epochs):
            order = draws.stream_order(len(data), data.labels.device, task, kind="pass")
            for start in range(0, len(data), batch_size):
                rows = order[start:start + batch_size]
                images = data.images[rows]
                inputs = self.transform(images)
                with torch.no_grad():
                    features = self.net.features(inputs)
                outputs = self.net.head(features)[:, self.n_past:self.n_seen]
                loss = F.cross_entropy(outputs, data.labels[rows] - self.n_past)
                self.optimizer_step(loss, opt, StepBatch(inputs, data.labels[rows], images, data.indices[rows],
                                                         task, self.plasticity.step))

    def distillation(self, outputs: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        """Batch mean of KL(softmax(old / T) ‖ softmax(new / T)) over the classes of earlier tasks."""
        temp = self.args.softmax_temp
        old = F.log_softmax(old_logits[:, :self.n_past] / temp, dim=1)
        new = F.log_softmax(outputs[:, :self.n_past] / temp, dim=1)
        return (old.exp() * (old - new)).sum(1).mean()

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        outputs = self.net(inputs)
        loss = self.loss(outputs[:, :self.n_seen], labels)
        if self.old_logits is not None:
            loss = loss + self.args.alpha * self.distillation(outputs, self.old_logits[self.row_of[indices]])
        return loss
