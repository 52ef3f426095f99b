"""rpc: Regular Polytope Classifier (Pernici et al., "Class-Incremental Learning with Pre-allocated Fixed
Classifiers", ICPR 2020, arXiv 2010.08657).

Classifier: the K classes of the whole dataset are pre-allocated to the K vertices of a regular
(K-1)-simplex centred at the origin, unit norm and equiangular (cosine -1/(K-1) between any two),
the columns of a fixed [K-1, K] matrix V computed as Mammoth's dsimplex. The network's linear head
keeps its K outputs; the first K-1 are the feature the fixed classifier reads, logits = out[:, :K-1] @ V
(the last output is unused, as in Mammoth's `self.net(x)[:, :-1]`). Since the classifier never
changes, classes still to come already own their directions and new classes do not move old ones.

Training: experience replay, the stream batch together with --minibatch_size stored examples, under
the cross-entropy of the fixed classifier's logits. The buffer is written only at the end of each
task (so the first task trains on its own examples alone): the classes already stored keep their
first --buffer_size // (seen classes) examples each, and the free slots are shared equally among the
task's classes (the remainder, one slot each, to classes drawn at random), filled by each class's
first examples in a random order of the task's training set.

Follows Mammoth's rpc.py with two differences. Mammoth takes the training cross-entropy on the
network's raw K outputs and applies the simplex only in evaluation; here the loss goes through the
fixed classifier, as in the paper (--loss_on_polytope 0 trains as Mammoth does). Mammoth's refactored
task counter is one behind the one its quota formula was written for, so its old classes keep
--buffer_size // (classes before the task) each, filling the whole buffer after the second task, whose
classes are then never stored; the quota here is --buffer_size // (seen classes), the formula as
first written.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import ContinualModel, register_model
from models._exemplars import check_class_incremental, concat_rows, first_per_group, rewrite_buffer, stored_rows


def dsimplex(num_classes: int) -> np.ndarray:
    """[num_classes - 1, num_classes] float64: column j is vertex j of a regular simplex centred at the
    origin with unit-norm vertices (Mammoth's dsimplex: the standard basis plus the vertex a·1, a =
    (1 - sqrt(m + 1)) / m in m = num_classes - 1 dimensions, centred and scaled)."""
    m = num_classes - 1
    x = np.zeros((m, m + 1))
    x[np.arange(m), np.arange(m)] = 1.0
    x[:, m] = (1.0 - np.sqrt(float(1 + m))) / float(m)
    x -= x.mean(axis=1, keepdims=True)
    return x / np.sqrt((x[:, 0] ** 2).sum())


class PolytopeHead(nn.Linear):
    """A linear layer of K outputs whose first K-1 are mapped onto the fixed simplex: logits = out[:, :-1] @ V."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        vertices = torch.from_numpy(dsimplex(out_features)).to(device=device, dtype=dtype or torch.float32)
        self.register_buffer("vertices", vertices)

    def raw(self, features: torch.Tensor) -> torch.Tensor:
        """The linear layer's K outputs."""
        return super().forward(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.raw(features)[:, :-1] @ self.vertices


@register_model("rpc")
class Rpc(ContinualModel):
    USES_BUFFER = True

    @staticmethod
    def add_args(parser):
        parser.add_argument("--loss_on_polytope", type=int, choices=(0, 1), default=1,
                            help="1: the cross-entropy is taken on the fixed simplex classifier's logits (the "
                                 "paper); 0: on the network's raw outputs, the simplex applied only in evaluation "
                                 "(Mammoth's rpc.py)")

    @classmethod
    def check_args(cls, args):
        check_class_incremental(cls.NAME, args)

    def __init__(self, backbone, dataset, args):
        linear = backbone.head  # replaced before the optimizer is built over the network's parameters
        head = PolytopeHead(linear.in_features, linear.out_features, device=linear.weight.device,
                            dtype=linear.weight.dtype)
        with torch.no_grad():  # the backbone's own initial weights, so one seed gives one network
            head.weight.copy_(linear.weight)
            if linear.bias is not None:
                head.bias.copy_(linear.bias)
            else:
                head.bias.zero_()
        backbone.head = head
        super().__init__(backbone, dataset, args)

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        if not self.buffer.is_empty():
            replay = self.buffer.get_data(self.args.minibatch_size, transform=self.transform)
            inputs = torch.cat((inputs, replay["examples"]))
            labels = torch.cat((labels, replay["labels"]))
        if self.args.loss_on_polytope:
            outputs = self.net(inputs)
        else:
            outputs = self.net.head.raw(self.net.features(inputs))
        return F.cross_entropy(outputs, labels)

    @torch.no_grad()
    def end_task(self, task):
        per_class = self.args.buffer_size // self.dataset.seen_classes(task)
        parts = []
        if not self.buffer.is_empty():  # each stored class keeps its first `per_class`, grouped by class
            labels = self.buffer.get_all()["labels"]
            kept = first_per_group(labels, per_class)
            kept = kept[torch.sort(labels[kept], stable=True).indices]
            parts.append(stored_rows(self.buffer, kept))
        free = self.args.buffer_size - sum(len(p["labels"]) for p in parts)
        classes = self.dataset.task_classes(task)
        quota = torch.full((len(classes),), free // len(classes), dtype=torch.long)
        quota[torch.randperm(len(classes))[:free - quota.sum()]] += 1
        split = self.dataset.train_split(task)
        order = torch.randperm(len(split), device=split.labels.device)
        within = split.labels[order] - classes.start
        # Rank of each example among those of its class, in the random order: the first quota[c] are kept.
        rank = (F.one_hot(within, len(classes)).cumsum(0).gather(1, within[:, None]).squeeze(1) - 1)
        picked = order[rank < quota.to(rank.device)[within]]
        parts.append({"examples": split.images[picked], "labels": split.labels[picked],
                      "indices": split.indices[picked], "task_labels": torch.full_like(picked, task)})
        rewrite_buffer(self.buffer, concat_rows(parts))
