"""bic: Bias Correction (Wu, Chen, Wang, Ye, Liu, Guo and Fu, "Large Scale Incremental Learning",
CVPR 2019).

Training of task t > 0: the stored exemplars and the task's examples are both split into a training
part and a small validation part, balanced over classes (each class, old and new, gives
round(--valset_split · buffer size / old classes) examples to validation). The network learns from
the training part with (1 - λ) · cross-entropy over the classes seen so far plus λ · T² ·
distillation, the cross-entropy between the softened (--temp T) outputs of the previous model and of
this one over the old classes, with λ = old classes / seen classes (the paper's n/(n+m), t/(t+1) for
tasks of equal size; --bic_lambda mammoth gives Mammoth's 1/(t+1) for task t counted from 0). With
--distill_after_bic the previous model's outputs carry its own bias correction.

Bias correction: after training task t > 0 the network is frozen and two parameters, α (initially 1)
and β (initially 0), are fitted with Adam (learning rate 0.001, --bic_epochs passes) to minimise the
cross-entropy on the validation part of q_k = α·o_k + β for the newest task's classes k (other
logits unchanged). `forward` applies this correction until the next task begins.

Memory: at the end of each task every seen class keeps --buffer_size // (classes seen) exemplars:
the earlier classes the first ones they stored, the new classes a random sample of their examples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from datasets import Split
from models import ContinualModel, register_model
from models._exemplars import (
    check_class_incremental,
    concat_rows,
    first_per_group,
    frozen_copy,
    in_batches,
    rewrite_buffer,
    stored_rows,
)

BIAS_LR = 1e-3  # Adam learning rate of the bias-correction layer (Mammoth's bic.py and the authors' code)
FEATURE_BATCH = 512


def bias_correct(logits: torch.Tensor, bias: torch.Tensor, classes: range) -> torch.Tensor:
    """The logits with those of `classes` replaced by α·o + β, where bias = (β, α); the rest unchanged."""
    start, stop = classes.start, classes.stop
    return torch.cat([logits[:, :start], bias[1] * logits[:, start:stop] + bias[0], logits[:, stop:]], dim=1)


@register_model("bic")
class Bic(ContinualModel):
    USES_BUFFER = True
    BOUNDS = {"bic_epochs": "[0, inf)", "temp": "(0, inf)", "valset_split": "(0, 1)", "wd_reg": "[0, inf)"}

    @staticmethod
    def add_args(parser):
        parser.add_argument("--bic_epochs", type=int, default=250,
                            help="passes over the validation set that fit the bias-correction layer (Mammoth: 250)")
        parser.add_argument("--temp", type=float, default=2.0, help="distillation temperature T (Mammoth: 2)")
        parser.add_argument("--valset_split", type=float, default=0.1,
                            help="fraction of the buffer held out, with as many new examples per class, to fit "
                                 "the bias correction (Mammoth: 0.1)")
        parser.add_argument("--wd_reg", type=float, default=0.0,
                            help="weight of the penalty Σ‖θ‖² added to the loss (Mammoth: off)")
        parser.add_argument("--distill_after_bic", type=int, choices=(0, 1), default=1,
                            help="1: distil from the previous model's bias-corrected outputs (Mammoth: 1)")
        parser.add_argument("--bic_lambda", choices=("paper", "mammoth"), default="paper",
                            help="distillation weight: old classes / seen classes (paper) or 1/(t+1) for task t "
                                 "counted from 0 (mammoth: Mammoth's bic)")

    @classmethod
    def check_args(cls, args):
        check_class_incremental(cls.NAME, args)
        super().check_args(args)

    def __init__(self, backbone, dataset, args):
        super().__init__(backbone, dataset, args)
        self.old_net = None  # the network at the end of the previous task
        self.bias = None  # (β, α) of the newest task's classes, applied by forward
        self.bias_task = -1  # the task whose classes self.bias corrects
        self.old_bias = None  # the previous model's correction (of the task before the current one)
        self.bias_record: dict = {}

    # ------------------------------------------------------------------ data

    def validation_split(self, task: int) -> tuple[Split, Split]:
        """(training part, validation part) of the task's examples and the stored exemplars: each class
        gives the same number of examples to validation. Drawn from a generator seeded by (--seed, task),
        so every call during a task gives the same split."""
        generator = torch.Generator().manual_seed(((self.args.seed or 0) * 1_000_003 + task) % 2**63)
        split = self.dataset.train_split(task)
        stored = self.buffer.get_all()
        n_old = self.dataset.task_classes(task).start
        per_class = max(1, round(self.args.valset_split * len(stored["labels"]) / n_old))

        def held_out(labels: torch.Tensor, classes: range) -> torch.Tensor:
            mask = torch.zeros(len(labels), dtype=torch.bool)
            host = labels.cpu()
            for c in classes:
                rows = torch.nonzero(host == c).flatten()
                mask[rows[torch.randperm(len(rows), generator=generator)[:per_class]]] = True
            return mask.to(labels.device)

        def part(source: Split, mask: torch.Tensor) -> Split:
            return Split(source.images[mask], source.labels[mask], source.indices[mask])

        old_val = held_out(stored["labels"], range(n_old))
        new_val = held_out(split.labels, self.dataset.task_classes(task))
        buffer_split = Split(stored["examples"], stored["labels"], stored["indices"])
        return (Split.concat([part(split, ~new_val), part(buffer_split, ~old_val)]),
                Split.concat([part(buffer_split, old_val), part(split, new_val)]))

    def training_data(self, task):
        if task == 0 or self.buffer.is_empty():
            return self.dataset.train_split(task)
        return self.validation_split(task)[0]

    # ------------------------------------------------------------------ training

    def begin_task(self, task):
        # The correction fitted after the previous task now belongs to the previous model.
        self.old_bias = self.bias if self.bias_task == task - 1 else None
        self.bias, self.bias_task = None, -1

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        outputs = self.net(inputs)
        n_seen, n_past = self.dataset.seen_classes(task), self.dataset.task_classes(task).start
        loss = F.cross_entropy(outputs[:, :n_seen], labels)
        if self.old_net is not None and n_past > 0:
            with torch.no_grad():
                old = self.old_net(inputs)
                if self.args.distill_after_bic and self.old_bias is not None:
                    old = bias_correct(old, self.old_bias, self.dataset.task_classes(task - 1))
            temp = self.args.temp
            distill = -(F.softmax(old[:, :n_past] / temp, dim=1)
                        * F.log_softmax(outputs[:, :n_past] / temp, dim=1)).sum(1).mean()
            lam = n_past / n_seen if self.args.bic_lambda == "paper" else 1 / (task + 1)
            loss = (1 - lam) * loss + lam * temp * temp * distill
        if self.args.wd_reg:
            loss = loss + self.args.wd_reg * sum(p.pow(2).sum() for p in self.net.parameters())
        return loss

    def fit_bias(self, logits: torch.Tensor, labels: torch.Tensor, task: int) -> torch.Tensor:
        """(β, α) fitted to the frozen network's validation logits, correcting the classes of `task`."""
        classes, n_seen = self.dataset.task_classes(task), self.dataset.seen_classes(task)
        bias = torch.tensor([0.0, 1.0], device=logits.device, requires_grad=True)
        optimizer = torch.optim.Adam([bias], lr=BIAS_LR)
        for _ in range(self.args.bic_epochs):
            order = torch.randperm(len(labels), device=logits.device)
            for start in range(0, len(labels), self.args.batch_size):
                rows = order[start:start + self.args.batch_size]
                loss = F.cross_entropy(bias_correct(logits[rows], bias, classes)[:, :n_seen], labels[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return bias.detach()

    def end_task(self, task):
        self.bias_record = {}
        if task > 0 and not self.buffer.is_empty():
            val = self.validation_split(task)[1]
            was_training = self.net.training
            self.net.eval()
            with torch.no_grad():
                logits = in_batches(lambda x: self.net(self.dataset.test_transform(x)), val.images, FEATURE_BATCH)
            self.net.train(was_training)
            n_seen = self.dataset.seen_classes(task)
            self.bias, self.bias_task = self.fit_bias(logits, val.labels, task), task
            with torch.no_grad():
                corrected = bias_correct(logits, self.bias, self.dataset.task_classes(task))
                self.bias_record = {
                    "bic_beta": float(self.bias[0]), "bic_alpha": float(self.bias[1]),
                    "bic_val_loss_before": float(F.cross_entropy(logits[:, :n_seen], val.labels)),
                    "bic_val_loss_after": float(F.cross_entropy(corrected[:, :n_seen], val.labels)),
                }
        self.old_net = frozen_copy(self.net)
        self.rebuild_buffer(task)

    @torch.no_grad()
    def rebuild_buffer(self, task: int) -> None:
        """Every seen class keeps buffer_size // seen classes exemplars: the first ones stored, and for the
        task's classes a random sample."""
        per_class = self.args.buffer_size // self.dataset.seen_classes(task)
        parts = []
        if not self.buffer.is_empty():
            parts.append(stored_rows(self.buffer, first_per_group(self.buffer.get_all()["labels"], per_class)))
        split = self.dataset.train_split(task)
        for c in self.dataset.task_classes(task):
            rows = torch.nonzero(split.labels == c).flatten()
            picked = rows[torch.randperm(len(rows), device=rows.device)[:per_class]]
            parts.append({"examples": split.images[picked], "labels": split.labels[picked],
                          "indices": split.indices[picked], "task_labels": torch.full_like(picked, task)})
        rewrite_buffer(self.buffer, concat_rows(parts))

    # ------------------------------------------------------------------ evaluation and records

    def forward(self, x):
        outputs = self.net(x)
        if self.bias is not None:
            outputs = bias_correct(outputs, self.bias, self.dataset.task_classes(self.bias_task))
        return outputs

    def task_record(self, task):
        return {"metrics": dict(self.bias_record)} if self.bias_record else {}
