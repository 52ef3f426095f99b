"""xder: eXtended Dark Experience Replay (Boschini, Bonicelli, Buzzega, Porrello and Calderara,
"Class-Incremental Continual Learning into the eXtended DER-verse", TPAMI 2022).

DER++ with four changes, following Mammoth's xder.py:

* the stream batch is classified among the current task's classes only (the present head), and the
  replayed cross-entropy (--beta) among the classes of past tasks; the logit replay (--alpha, MSE on
  all outputs) is DER's;
* past logits are updated: whenever a replayed example of a past task is drawn, with probability
  1 / (times drawn this task), its stored logits of the current and later tasks' heads are
  overwritten by the network's outputs, and the same happens for every past example at the end of
  the task ("future past"); a transplanted head whose maximum exceeds the stored logit of the
  example's true class is scaled by --gamma · (that logit / the maximum), so the true class stays on
  top. New examples enter the buffer at the end of their task, class-balanced, with their logits of
  the past heads scaled down the same way against their own class's logit;
* a consistency term (--lambd) prepares the future heads: --simclr_num_aug strongly augmented views
  of the stream batch and of --simclr_batch_size buffer examples go through the network, and each
  future task's block of outputs is treated as a projection (X-DER uses the heads themselves, so no
  separate projection head is needed) under a supervised contrastive loss at --simclr_temp;
* constraints (weight --constr_eta, margin --constr_margin): the future heads' maximum must stay
  the margin below the maximum of the example's own task's head (stream and replayed examples,
  --future_constraint), and, with --past_constraint, the past heads' softmax maximum the margin
  below the current head's on the stream.

The buffer holds --buffer_size // (classes seen) examples per class after each task: the first ones
stored for earlier classes, a random choice for the task's classes. With --align_bn the batch-norm
running statistics are updated only by the first replay batch mixed with a slice of the stream
batch (Mammoth's BatchNorm alignment).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models import ContinualModel, register_model
from models._contrastive import strong_augment, supcon_loss
from models._exemplars import (
    batch_statistics_mode,
    check_class_incremental,
    concat_rows,
    first_per_group,
    frozen_bn_statistics,
    in_batches,
    rewrite_buffer,
    stored_rows,
)
from utils import draws


@register_model("xder")
class Xder(ContinualModel):
    USES_BUFFER = True
    BOUNDS = {"alpha": "[0, inf)", "beta": "[0, inf)", "gamma": "[0, inf)", "lambd": "[0, inf)",
              "constr_eta": "[0, inf)", "constr_margin": "[0, inf)", "simclr_temp": "(0, inf)",
              "simclr_batch_size": "[1, inf)",
              "simclr_num_aug": "[2, inf)"}  # the contrastive loss pairs the views of each example

    @staticmethod
    def add_args(parser):
        source = "X-DER paper, seq-cifar100 buffer 500"
        parser.add_argument("--alpha", type=float, default=0.3,
                            help=f"weight of the logit-matching (MSE) replay loss, as DER's ({source}: 0.3)")
        parser.add_argument("--beta", type=float, default=0.8,
                            help=f"weight of the replayed cross-entropy loss, as DER++'s ({source}: 0.8)")
        parser.add_argument("--gamma", type=float, default=0.85,
                            help="scale of an updated logit head against the true class's logit (Mammoth: 0.85)")
        parser.add_argument("--lambd", type=float, default=0.05,
                            help="weight of the future heads' consistency loss (Mammoth: 0.05)")
        parser.add_argument("--constr_eta", type=float, default=0.1,
                            help="weight of the past/future logit constraints, the paper's η (Mammoth: 0.1)")
        parser.add_argument("--constr_margin", type=float, default=0.3,
                            help="margin of the past/future logit constraints, the paper's m (Mammoth: 0.3)")
        parser.add_argument("--simclr_temp", type=float, default=5.0,
                            help="temperature of the consistency loss (Mammoth: 5)")
        parser.add_argument("--simclr_batch_size", type=int, default=64,
                            help="buffer examples added to the stream batch for the consistency loss (Mammoth: 64)")
        parser.add_argument("--simclr_num_aug", type=int, default=4,
                            help="augmented views per example in the consistency loss (Mammoth: 4)")
        parser.add_argument("--past_constraint", type=int, choices=(0, 1), default=0,
                            help="1: constrain the past heads' softmax below the current head's (Mammoth: 0)")
        parser.add_argument("--future_constraint", type=int, choices=(0, 1), default=1,
                            help="1: constrain the future heads' logits below the own task's head (Mammoth: 1)")
        parser.add_argument("--align_bn", type=int, choices=(0, 1), default=1,
                            help="1: batch-norm statistics from the first replay batch mixed with the stream "
                                 "(Mammoth: 1)")

    @classmethod
    def check_args(cls, args):
        check_class_incremental(cls.NAME, args)
        super().check_args(args)

    def __init__(self, backbone, dataset, args):
        super().__init__(backbone, dataset, args)
        self.cpt = dataset.classes_per_task
        self.n_tasks = dataset.n_tasks
        # Times each slot was drawn for replay this task (its logits are updated with probability 1 / that).
        self.update_counter = torch.zeros(args.buffer_size, device=self.device)

    # ------------------------------------------------------------------ logit updates

    def update_logits(self, old: torch.Tensor, new: torch.Tensor, labels: torch.Tensor, first_task: int,
                      n_heads: int) -> torch.Tensor:
        """`old` with the heads of tasks first_task .. first_task + n_heads - 1 taken from `new`; where the
        taken block's maximum exceeds old's logit of the true class, the block is scaled by
        gamma · (that logit / the maximum)."""
        columns = slice(first_task * self.cpt, (first_task + n_heads) * self.cpt)
        transplant = new[:, columns].clone()
        if len(transplant) == 0 or transplant.shape[1] == 0:
            return old.clone()
        true_logit = old.gather(1, labels[:, None]).squeeze(1)
        top = transplant.max(1).values
        scale = torch.where(top > true_logit, self.args.gamma * true_logit / top, torch.ones_like(top))
        updated = old.clone()
        updated[:, columns] = transplant * scale[:, None]
        return updated

    def sample(self, size: int, transform=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A random batch of at most `size` stored examples and the slots they sit in (the slots let the
        updated logits be written back)."""
        slots = draws.replay_rows(len(self.buffer), size, self.device)
        rows = stored_rows(self.buffer, slots)
        if transform is not None:
            rows["examples"] = transform(rows["examples"])
        return slots, rows

    # ------------------------------------------------------------------ training step

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        n_past, n_seen = self.dataset.task_classes(task).start, self.dataset.seen_classes(task)
        align = bool(self.args.align_bn)
        with frozen_bn_statistics(self.net, align and task > 0):
            outputs = self.net(inputs)
        loss = F.cross_entropy(outputs[:, n_past:n_seen], labels - n_past)  # the present head

        replayed = None
        if not self.buffer.is_empty():
            slots1, rows1 = self.sample(self.args.minibatch_size, self.transform)
            batch1 = rows1["examples"]
            if align:  # BatchNorm statistics from the replay batch with a slice of the stream
                batch1 = torch.cat([batch1, inputs[: self.args.minibatch_size // max(task, 1)]])
            outputs1 = self.net(batch1)[: len(slots1)]
            loss = loss + self.args.alpha * F.mse_loss(outputs1, rows1["logits"])

            slots2, rows2 = self.sample(self.args.minibatch_size, self.transform)
            with frozen_bn_statistics(self.net, align):
                outputs2 = self.net(rows2["examples"])
            if n_past > 0:
                loss = loss + self.args.beta * F.cross_entropy(outputs2[:, :n_past], rows2["labels"])

            # Both replay batches, each slot once (its first draw), for the updates and the constraint.
            unique = torch.cat([torch.ones_like(slots1, dtype=torch.bool), ~torch.isin(slots2, slots1)])
            replayed = {"slots": torch.cat([slots1, slots2])[unique],
                        "labels": torch.cat([rows1["labels"], rows2["labels"]])[unique],
                        "logits": torch.cat([rows1["logits"], rows2["logits"]])[unique],
                        "outputs": torch.cat([outputs1, outputs2])[unique]}
            self.update_past_logits(replayed, task)

        if task < self.n_tasks - 1:
            if self.args.lambd > 0:
                loss = loss + self.args.lambd * self.consistency_loss(labels, not_aug_inputs, n_seen)
            if self.args.future_constraint:
                loss = loss + self.future_constraint(outputs, replayed, task)
        if self.args.past_constraint and task > 0:
            probabilities = F.softmax(outputs[:, :n_seen], dim=1)
            gap = (probabilities[:, :n_past].max(1).values.detach() + self.args.constr_margin
                   - probabilities[:, n_past:n_seen].max(1).values)
            loss = loss + self.hinge(gap)
        return loss

    @torch.no_grad()
    def update_past_logits(self, replayed: dict[str, torch.Tensor], task: int) -> None:
        """Overwrite the current and future heads of replayed past-task examples, each with probability
        1 / (times its slot was drawn this task)."""
        past = replayed["labels"] < self.dataset.task_classes(task).start
        slots = replayed["slots"]
        self.update_counter[slots[past]] += 1
        draw = torch.rand(len(slots), device=self.device) * self.update_counter[slots]
        chosen = past & (draw < 1)
        self.buffer.logits[slots[chosen]] = self.update_logits(
            replayed["logits"][chosen], replayed["outputs"][chosen].detach(), replayed["labels"][chosen],
            task, self.n_tasks - task)
        self.buffer.task_labels[slots[chosen]] = task

    def hinge(self, gap: torch.Tensor) -> torch.Tensor:
        """constr_eta · the mean of the positive violations (0 when none), without a host synchronisation."""
        n_violated = (gap > 0).sum().clamp(min=1)
        return self.args.constr_eta * gap.clamp(min=0).sum() / n_violated

    def future_constraint(self, outputs: torch.Tensor, replayed: dict | None, task: int) -> torch.Tensor:
        """The future heads' maximum at least the margin below that of the example's own task's head."""
        n_past, n_seen = self.dataset.task_classes(task).start, self.dataset.seen_classes(task)
        future, own = outputs[:, n_seen:], outputs[:, n_past:n_seen]
        if replayed is not None:
            heads = replayed["outputs"].reshape(len(replayed["outputs"]), self.n_tasks, self.cpt)
            own_heads = heads[torch.arange(len(heads), device=heads.device), replayed["labels"] // self.cpt]
            future = torch.cat([future, replayed["outputs"][:, n_seen:]])
            own = torch.cat([own, own_heads])
        return self.hinge(future.max(1).values + self.args.constr_margin - own.max(1).values)

    def consistency_loss(self, labels: torch.Tensor, not_aug_inputs: torch.Tensor, n_seen: int) -> torch.Tensor:
        """Supervised contrastive loss on each future head's outputs for strongly augmented views of the
        stream batch and of a buffer batch, summed over heads, divided by heads × examples."""
        images, classes = not_aug_inputs, labels
        if not self.buffer.is_empty():
            _, rows = self.sample(self.args.simclr_batch_size)
            images, classes = torch.cat([rows["examples"], images]), torch.cat([rows["labels"], classes])
        views = self.args.simclr_num_aug
        with torch.no_grad():
            augmented = strong_augment(images.repeat_interleave(views, 0), self.dataset.MEAN, self.dataset.STD)
        with frozen_bn_statistics(self.net, bool(self.args.align_bn)):
            outputs = self.net(augmented)
        future = outputs.reshape(len(images), views, -1)[:, :, n_seen:]
        heads = future.split(self.cpt, dim=2)
        total = sum(supcon_loss(F.normalize(head, dim=2), classes, self.args.simclr_temp) for head in heads)
        return total / (len(heads) * len(images))

    # ------------------------------------------------------------------ end of task

    @torch.no_grad()
    def end_task(self, task):
        n_past, n_seen = self.dataset.task_classes(task).start, self.dataset.seen_classes(task)
        parts = []
        if not self.buffer.is_empty():  # earlier classes keep their first buffer_size // seen classes
            parts.append(stored_rows(self.buffer, first_per_group(self.buffer.get_all()["labels"],
                                                                  self.args.buffer_size // n_seen)))
        free = self.args.buffer_size - (len(parts[0]["labels"]) if parts else 0)
        quota = torch.full((self.cpt,), free // self.cpt, dtype=torch.long)
        quota[torch.randperm(self.cpt)[: free - int(quota.sum())]] += 1  # the remainder to random classes
        split = self.dataset.train_split(task)
        order = torch.randperm(len(split), device=split.labels.device)
        picked = torch.cat([order[split.labels[order] == n_past + k][: int(quota[k])] for k in range(self.cpt)])
        with batch_statistics_mode(self.net):
            logits = in_batches(lambda x: self.net(self.transform(x)), split.images[picked], self.args.batch_size)
        if task > 0:  # the past heads of a new example stay below its own class's logit
            logits = self.update_logits(logits, logits, split.labels[picked], 0, task)
        parts.append({"examples": split.images[picked], "labels": split.labels[picked],
                      "indices": split.indices[picked], "task_labels": torch.full_like(picked, task),
                      "logits": logits})
        rewrite_buffer(self.buffer, concat_rows(parts))
        self.update_future_past(task)
        self.update_counter.zero_()

    @torch.no_grad()
    def update_future_past(self, task: int) -> None:
        """Every stored example of a past task takes the network's outputs for the heads of this and the
        later tasks (scaled as in update_logits)."""
        stored = self.buffer.get_all()
        slots = torch.nonzero(stored["labels"] < self.dataset.task_classes(task).start).flatten()
        if len(slots) == 0:
            return
        with batch_statistics_mode(self.net):
            outputs = in_batches(lambda x: self.net(self.transform(x)), stored["examples"][slots], self.args.batch_size)
        self.buffer.logits[slots] = self.update_logits(stored["logits"][slots], outputs, stored["labels"][slots],
                                                       task, self.n_tasks - task)
        self.buffer.task_labels[slots] = task
