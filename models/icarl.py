"""icarl: Incremental Classifier and Representation Learning (Rebuffi, Kolesnikov, Sperl and Lampert,
"iCaRL: Incremental Classifier and Representation Learning", CVPR 2017).

Training: each task trains on its own examples together with the stored exemplars, with binary
cross-entropy on sigmoid outputs; the targets of the classes of earlier tasks are the previous
model's sigmoid outputs (distillation), those of the other classes the one-hot label. A weight
penalty --wd_reg · Σ‖θ‖² is added to the loss, as in Mammoth's icarl.py, whose optimizer uses no
weight decay.

Memory: at the end of each task every class keeps --buffer_size // (classes seen) exemplars; the
classes seen before keep the first ones they stored, and each new class picks its exemplars by
herding on L2-normalised features (the example that brings the running mean of the picked ones
closest to the class mean, one at a time).

Classification: nearest mean of exemplars. In evaluation mode `forward` returns minus the squared
distance between the normalised features of the input and each class's mean of normalised exemplar
features (renormalised), -inf for classes without exemplars; in training mode it returns the
network's outputs. On datasets whose augmentation flips images horizontally the class mean also
averages the exemplars' flipped copies (the paper's practice); --class_mean_flip always averages them on
every dataset, digits included, as Mammoth's icarl does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from datasets import Split
from models import ContinualModel, register_model
from models._exemplars import (
    check_class_incremental,
    concat_rows,
    first_per_group,
    frozen_copy,
    herding,
    in_batches,
    rewrite_buffer,
    stored_rows,
)
from utils import draws
from utils.errors import ConfigError

FEATURE_BATCH = 512  # examples per forward pass when extracting features outside training


@register_model("icarl")
class Icarl(ContinualModel):
    USES_BUFFER = True
    BOUNDS = {"wd_reg": "[0, inf)"}

    @staticmethod
    def add_args(parser):
        parser.add_argument("--wd_reg", "--opt_wd", dest="wd_reg", type=float, default=1e-5,
                            help="weight of the penalty Σ‖θ‖² added to the loss (Mammoth icarl.py's --opt_wd, "
                                 "default 1e-5; iCaRL's optimizer itself uses no weight decay)")
        parser.add_argument("--class_mean_flip", choices=("augmentation", "always"), default="augmentation",
                            help="average the exemplars' horizontally flipped copies into the class means where "
                                 "the dataset's augmentation flips (augmentation), or on every dataset (always: "
                                 "Mammoth's icarl)")

    @classmethod
    def check_args(cls, args):
        check_class_incremental(cls.NAME, args)
        super().check_args(args)
        if args.optim_wd != 0:
            raise ConfigError(f"icarl regularises the weights through --wd_reg, not the optimizer (as Mammoth's "
                              f"icarl ignores --optim_wd); pass --optim_wd 0 and --wd_reg {args.optim_wd} instead")

    def __init__(self, backbone, dataset, args):
        super().__init__(backbone, dataset, args)
        self.old_net = None  # the network at the end of the previous task, distilled from
        self.class_means = None  # [N_CLASSES, D] cache for nearest-mean classification, NaN rows: no exemplars

    # ------------------------------------------------------------------ training

    def training_data(self, task):
        """The task's examples and every stored exemplar (Mammoth's icarl_replay)."""
        split = self.dataset.train_split(task)
        if self.buffer.is_empty():
            return split
        stored = self.buffer.get_all()
        return Split.concat([split, Split(stored["examples"], stored["labels"], stored["indices"])])

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        self.class_means = None
        outputs = self.net(inputs)
        targets = F.one_hot(labels, outputs.shape[1]).to(outputs.dtype)
        if self.old_net is not None:
            n_past = self.dataset.task_classes(task).start
            with torch.no_grad():
                targets[:, :n_past] = torch.sigmoid(self.old_net(inputs)[:, :n_past])
        loss = F.binary_cross_entropy_with_logits(outputs, targets)
        if self.args.wd_reg:
            loss = loss + self.args.wd_reg * sum(p.pow(2).sum() for p in self.net.parameters())
        return loss

    # ------------------------------------------------------------------ exemplars

    @torch.no_grad()
    def normalized_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised penultimate features of uint8 images (no augmentation), in evaluation mode."""
        was_training = self.net.training
        self.net.eval()
        features = in_batches(lambda x: self.net.features(self.dataset.test_transform(x)), images, FEATURE_BATCH)
        self.net.train(was_training)
        return F.normalize(features.flatten(1), dim=1)

    @torch.no_grad()
    def end_task(self, task):
        self.old_net = frozen_copy(self.net)
        n_seen = self.dataset.seen_classes(task)
        per_class = self.args.buffer_size // n_seen
        parts = []
        if not self.buffer.is_empty():  # earlier classes keep their first `per_class` exemplars
            kept = first_per_group(self.buffer.get_all()["labels"], per_class)
            parts.append(stored_rows(self.buffer, kept))
        split = self.dataset.train_split(task)
        # Herding reads the task's examples in the order of one pass over its stream: the result is the same
        # in any order but for exact ties, which go to the first candidate read.
        order = draws.stream_order(len(split), split.labels.device, task, kind="pass")
        for c in self.dataset.task_classes(task):
            rows = order[split.labels[order] == c]
            picked = rows[herding(self.normalized_features(split.images[rows]), per_class)]
            parts.append({"examples": split.images[picked], "labels": split.labels[picked],
                          "indices": split.indices[picked], "task_labels": torch.full_like(picked, task)})
        rewrite_buffer(self.buffer, concat_rows(parts))
        self.class_means = None

    # ------------------------------------------------------------------ nearest mean of exemplars

    @torch.no_grad()
    def compute_class_means(self) -> torch.Tensor:
        """Per class, the renormalised mean of its exemplars' normalised features (averaged with that of
        their horizontally flipped copies where --class_mean_flip asks); NaN without exemplars."""
        stored = self.buffer.get_all()
        features = self.normalized_features(stored["examples"])
        if self.dataset.FLIP or self.args.class_mean_flip == "always":
            features = (features + self.normalized_features(stored["examples"].flip(3))) / 2
        means = torch.full((self.dataset.N_CLASSES, features.shape[1]), float("nan"), device=features.device)
        for c in torch.unique(stored["labels"]).tolist():
            means[c] = F.normalize(features[stored["labels"] == c].mean(0), dim=0)
        return means

    def forward(self, x):
        if self.training or self.buffer.is_empty():
            return self.net(x)
        if self.class_means is None:
            self.class_means = self.compute_class_means()
        features = F.normalize(self.net.features(x).flatten(1), dim=1)
        distances = (features[:, None, :] - self.class_means[None, :, :]).pow(2).sum(2)
        return torch.where(distances.isnan(), -math.inf, -distances)
