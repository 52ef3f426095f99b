"""lucir: Learning a Unified Classifier Incrementally via Rebalancing (Hou, Pan, Loy, Wang and Lin,
"Learning a Unified Classifier Incrementally via Rebalancing", CVPR 2019).

Classifier: the backbone's linear head is replaced by a cosine classifier, logits = σ · cos(f, w_c)
with one weight row w_c per class (all classes of the dataset, as Mammoth's) and a learned scale σ
(initially 1). While task t trains, only its classes' rows (with σ and the backbone) are updated;
the rows of the other tasks are frozen, as Mammoth's per-task weights without gradients.

Loss on a batch of task t (its examples and the stored exemplars):
  cross-entropy of σ · cos over every class
  + λ_t · (1 - cos(f(x), f_old(x)))  averaged over the batch: the less-forget constraint on the
    penultimate features of the network frozen at the end of the previous task, with the adaptive
    weight λ_t = --lamda_base · sqrt(old classes / new classes) (the paper's);
  + --lamda_mr · margin ranking: for each exemplar of an old class, its cosine to its own class
    must exceed by --mr_margin each of its --k_mr largest cosines to the classes from task t on.
Task 0 uses the cross-entropy alone.

At the start of task t > 0 the new classes' rows are imprinted (--imprint_weights): each becomes
the normalised mean of the class's normalised features, scaled to the mean norm of the old rows;
the optimizer's state (momentum) restarts, as Mammoth builds a new one for every task.

At the end of each task every seen class keeps --buffer_size // (seen classes) exemplars: the old
classes their first ones, the new classes theirs chosen by herding on the penultimate features
(Mammoth's fill_buffer), and then the classifier alone (the task's rows and σ) is finetuned on the
exemplars, class-balanced, for --fitting_epochs passes at --lr_finetune with the same loss, batch
norm statistics frozen; the rate falls tenfold after the first 10 finetuning batches, since
Mammoth's MultiStepLR with milestone 10 is stepped once per batch.

Follows Mammoth's lucir.py, including the cross-entropy and the ranking's hard negatives over the
future classes' rows, with two differences: λ_t is the paper's sqrt(old / new classes) (Mammoth
computes sqrt(t - 1) · lamda_base at task t, since its refactored task counter is one behind the
one its formula was written for, so its task 1 has no feature distillation); and the imprinted
rows are averaged over unaugmented examples (Mammoth passes the training set's augmentation).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from datasets import DATASETS, Split
from models import ContinualModel, register_model
from models._exemplars import (
    check_class_incremental,
    concat_rows,
    first_per_group,
    frozen_bn_statistics,
    frozen_copy,
    herding,
    in_batches,
    rewrite_buffer,
    stored_rows,
)
from utils.errors import ConfigError
from utils.lifecycle import StepBatch

FEATURE_BATCH = 512  # examples per forward pass when extracting features outside training
FINETUNE_MILESTONE = 10  # finetuning batches after which the rate falls tenfold (Mammoth's ft_lr_strat)


class CosineClassifier(nn.Module):
    """logits = σ · cos(features, weight rows): the unified classifier. `weight` has a linear layer's shape
    ([classes, features]) so hidden-unit bookkeeping that reads `head.weight` works unchanged."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.sigma = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mammoth's CustomClassifier: rows uniform within 1/sqrt(features), σ = 1."""
        self.reset_rows(range(self.out_features))
        self.sigma.fill_(1.0)

    @torch.no_grad()
    def reset_rows(self, rows: range) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight[rows.start:rows.stop].uniform_(-bound, bound)

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """cos(features, w_c) for every class, without the scale."""
        return F.normalize(features.flatten(1), dim=1) @ F.normalize(self.weight, dim=1).t()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.cosine(features) * self.sigma


def margin_ranking_loss(cosine: torch.Tensor, labels: torch.Tensor, n_past: int, k: int,
                        margin: float) -> torch.Tensor:
    """Mean over the examples of old classes (label < n_past) and their k hardest negatives among the
    classes from n_past on of max(0, margin - cos(own class) + cos(negative)); 0 without such examples."""
    old = labels < n_past
    if not old.any():
        return cosine.new_zeros(())
    own = cosine[old].gather(1, labels[old, None])  # [n_old, 1]
    hardest = cosine[old, n_past:].topk(k, dim=1).values  # [n_old, k]
    return F.relu(margin - own + hardest).mean()


@register_model("lucir")
class Lucir(ContinualModel):
    USES_BUFFER = True
    BOUNDS = {"lamda_base": "[0, inf)", "lamda_mr": "[0, inf)", "k_mr": "[1, inf)", "mr_margin": "[0, inf)",
              "fitting_epochs": "[0, inf)", "lr_finetune": "[0, inf)"}

    @staticmethod
    def add_args(parser):
        parser.add_argument("--lamda_base", type=float, default=5.0,
                            help="base weight of the feature distillation, scaled by sqrt(old/new classes) (Mammoth: 5)")
        parser.add_argument("--lamda_mr", type=float, default=1.0, help="weight of the margin ranking loss (Mammoth: 1)")
        parser.add_argument("--k_mr", type=int, default=2, help="hard negatives per old example in the ranking (Mammoth: 2)")
        parser.add_argument("--mr_margin", type=float, default=0.5, help="margin of the ranking loss (Mammoth: 0.5)")
        parser.add_argument("--fitting_epochs", type=int, default=20,
                            help="passes of class-balanced finetuning of the classifier on the exemplars after each "
                                 "task, 0 for none (Mammoth: 20)")
        parser.add_argument("--lr_finetune", type=float, default=0.01,
                            help="learning rate of the class-balanced finetuning (Mammoth: 0.01)")
        parser.add_argument("--imprint_weights", type=int, choices=(0, 1), default=1,
                            help="1: start the new classes' rows from their mean normalised features (Mammoth: 1)")

    @classmethod
    def check_args(cls, args):
        check_class_incremental(cls.NAME, args)
        dataset = DATASETS.get(args.dataset)
        per_task = dataset.N_CLASSES // (args.n_tasks or dataset.N_TASKS)
        if args.k_mr > per_task:
            raise ConfigError(f"--k_mr {args.k_mr} asks for more hard negatives than the {per_task} classes of the "
                              f"last task; pass --k_mr of at most {per_task}")
        if args.optimizer != "sgd":
            raise ConfigError(f"lucir trains with SGD, as Mammoth's builds its per-task optimizers; drop "
                              f"--optimizer {args.optimizer}")

    def __init__(self, backbone, dataset, args):
        weight = backbone.head.weight  # before the optimizer is built over the network's parameters
        backbone.head = CosineClassifier(weight.shape[1], dataset.N_CLASSES, device=weight.device, dtype=weight.dtype)
        super().__init__(backbone, dataset, args)
        # The head's rows decay only within the trainable task's block (after_backward adds it), so their
        # parameter sits in a group of its own without the optimizer's weight decay.
        group = self.opt.param_groups[0]
        group["params"] = [p for p in group["params"] if p is not self.net.head.weight]
        self.opt.add_param_group({"params": [self.net.head.weight], "weight_decay": 0.0})
        self.old_net = None  # the network at the end of the previous task: the features distilled from

    # ------------------------------------------------------------------ training

    def distillation_weight(self, task: int) -> float:
        """λ_t = lamda_base · sqrt(old classes / new classes)."""
        n_new = len(self.dataset.task_classes(task))
        return self.args.lamda_base * math.sqrt(self.dataset.task_classes(task).start / n_new)

    def training_data(self, task):
        """The task's examples and every stored exemplar (Mammoth's icarl_replay)."""
        split = self.dataset.train_split(task)
        if self.buffer.is_empty():
            return split
        stored = self.buffer.get_all()
        return Split.concat([split, Split(stored["examples"], stored["labels"], stored["indices"])])

    def lucir_loss(self, inputs: torch.Tensor, labels: torch.Tensor, task: int) -> torch.Tensor:
        features = self.net.features(inputs).flatten(1)
        cosine = self.net.head.cosine(features)
        loss = F.cross_entropy(cosine * self.net.head.sigma, labels)
        if task > 0:
            with torch.no_grad():
                old = self.old_net.features(inputs).flatten(1)
            ones = torch.ones(len(features), device=features.device)
            loss = loss + self.distillation_weight(task) * F.cosine_embedding_loss(features, old, ones)
            n_past = self.dataset.task_classes(task).start
            loss = loss + self.args.lamda_mr * margin_ranking_loss(cosine, labels, n_past, self.args.k_mr,
                                                                   self.args.mr_margin)
        return loss

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        return self.lucir_loss(inputs, labels, task)

    def after_backward(self, task):
        """Freeze the rows of the other tasks; the trainable rows get the weight decay of their own."""
        weight = self.net.head.weight
        if weight.grad is None:
            return
        classes = self.dataset.task_classes(task)
        trainable = torch.zeros(len(weight), 1, dtype=torch.bool, device=weight.device)
        trainable[classes.start:classes.stop] = True
        grad = weight.grad + self.args.optim_wd * weight.detach() if self.args.optim_wd else weight.grad
        weight.grad = torch.where(trainable, grad, torch.zeros_like(grad))

    @torch.no_grad()
    def begin_task(self, task):
        self.opt.state.clear()  # a fresh optimizer per task, as Mammoth's
        if task == 0:
            return
        classes = self.dataset.task_classes(task)
        if self.args.imprint_weights:
            self.imprint(task)
        else:
            self.net.head.reset_rows(classes)

    @torch.no_grad()
    def imprint(self, task: int) -> None:
        """Each new class's row: its normalised mean normalised feature, at the old rows' mean norm."""
        head, classes = self.net.head, self.dataset.task_classes(task)
        # The mean norm in double precision, as Mammoth scales by it.
        old_norm = head.weight[:classes.start].norm(dim=1).mean().double()
        split = self.dataset.train_split(task)
        for c in classes:
            features = self.features(split.images[split.labels == c])
            direction = F.normalize(F.normalize(features, dim=1).mean(0), dim=0)
            head.weight[c] = (direction.double() * old_norm).to(head.weight.dtype)

    # ------------------------------------------------------------------ exemplars and finetuning

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of uint8 images (no augmentation), in evaluation mode."""
        was_training = self.net.training
        self.net.eval()
        features = in_batches(lambda x: self.net.features(self.dataset.test_transform(x)), images, FEATURE_BATCH)
        self.net.train(was_training)
        return features.flatten(1)

    def end_task(self, task):
        self.old_net = frozen_copy(self.net)
        self.store_exemplars(task)
        if self.args.fitting_epochs > 0:
            self.finetune(task)

    @torch.no_grad()
    def store_exemplars(self, task: int) -> None:
        """Every seen class keeps buffer_size // seen classes exemplars: the old classes their first ones,
        the new classes theirs by herding on the features (Mammoth's fill_buffer, use_herding=True)."""
        per_class = self.args.buffer_size // self.dataset.seen_classes(task)
        parts = []
        if not self.buffer.is_empty():
            parts.append(stored_rows(self.buffer, first_per_group(self.buffer.get_all()["labels"], per_class)))
        split = self.dataset.train_split(task)
        for c in self.dataset.task_classes(task):
            rows = torch.nonzero(split.labels == c).flatten()
            picked = rows[herding(self.features(split.images[rows]), per_class)]
            parts.append({"examples": split.images[picked], "labels": split.labels[picked],
                          "indices": split.indices[picked], "task_labels": torch.full_like(picked, task)})
        rewrite_buffer(self.buffer, concat_rows(parts))

    def finetune(self, task: int) -> None:
        """Class-balanced finetuning of the classifier (the task's rows and σ) on the exemplars, batch norm
        statistics frozen (Mammoth's fit_buffer). Its steps go through `optimizer_step`."""
        head = self.net.head
        opt = torch.optim.SGD([{"params": [head.sigma]}, {"params": [head.weight], "weight_decay": 0.0}],
                              lr=self.args.lr_finetune, momentum=self.args.optim_mom, weight_decay=self.args.optim_wd)
        schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[FINETUNE_MILESTONE], gamma=0.1)
        stored = self.buffer.get_all()
        batch_size = self.args.batch_size
        with frozen_bn_statistics(self.net):
            for _ in range(self.args.fitting_epochs):
                images = self.transform(stored["examples"])
                order = torch.randperm(len(images), device=images.device)
                for start in range(0, len(order), batch_size):
                    rows = order[start:start + batch_size]
                    labels = stored["labels"][rows]
                    loss = self.lucir_loss(images[rows], labels, task)
                    self.optimizer_step(loss, opt, StepBatch(images[rows], labels, stored["examples"][rows],
                                                             stored["indices"][rows], task, self.plasticity.step))
                    schedule.step()
        self.net.zero_grad(set_to_none=True)  # the backbone's gradients of these steps were never used
