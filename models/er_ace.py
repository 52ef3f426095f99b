"""er_ace: Experience Replay with the asymmetric cross-entropy (ER-ACE).

L. Caccia, R. Aljundi, N. Asadi, T. Tuytelaars, J. Pineau, E. Belilovsky, "New Insights on Reducing
Abrupt Representation Change in Online Continual Learning", ICLR 2022.

The incoming batch's cross-entropy is taken only over the logits of the classes present in the batch
and of the classes from the largest label seen so far on (those still to come), so new classes do not
push the logits of old classes down; the replayed batch's cross-entropy is over all classes. As in
Mammoth's er_ace, the first task (unless --task_free) uses neither the mask nor the replay, and the
head is by default the cosine classifier of the original work (scale 10, no bias).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models import ContinualModel, register_model

COSINE_SCALE = 10.0  # the original work's (and Mammoth's) scale of the cosine similarities
COSINE_EPS = 1e-5  # added to the norms, as in Mammoth's CustomLinear


class CosineHead(nn.Module):
    """Logits = scale · cos(features, class weight): the classifier of the original ER-ACE code.

    The weight has the shape of a linear layer's ([classes, features]) and PyTorch's linear
    initialisation, so hidden-unit bookkeeping that reads `head.weight` works unchanged.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / (x.norm(dim=1, keepdim=True) + COSINE_EPS)
        w = self.weight / (self.weight.norm(dim=1, keepdim=True) + COSINE_EPS)
        return COSINE_SCALE * (x @ w.t())  # scaled after the product, as Mammoth (the rounding differs otherwise)


@register_model("er_ace")
class ErAce(ContinualModel):
    """ER with the asymmetric cross-entropy: masked stream loss, replay loss over every class."""

    USES_BUFFER = True

    @staticmethod
    def add_args(parser):
        parser.add_argument("--task_free", type=int, choices=(0, 1), default=0,
                            help="1: mask and replay from the first task on, not from the second (Mammoth's er_ace)")
        parser.add_argument("--use_custom_classifier", type=int, choices=(0, 1), default=1,
                            help="1: replace the backbone's linear head by the original work's cosine classifier "
                                 "(Mammoth's er_ace)")

    def __init__(self, backbone, dataset, args):
        if args.use_custom_classifier:  # before the optimizer is built over the network's parameters
            weight = backbone.head.weight
            backbone.head = CosineHead(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        super().__init__(backbone, dataset, args)
        self.seen = torch.zeros(dataset.N_CLASSES, dtype=torch.bool, device=self.device)  # labels seen so far
        self.classes = torch.arange(dataset.N_CLASSES, device=self.device)

    def uses_mask_and_replay(self, task: int) -> bool:
        return task > 0 or self.args.task_free

    def stream_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """Classes whose logits enter the stream loss: those in the batch and every class from the largest
        label seen so far (this batch included) on. Updates the classes seen so far."""
        present = torch.zeros_like(self.seen)
        present[labels] = True
        self.seen |= present
        largest = torch.where(self.seen, self.classes, -1).max()
        return present | (self.classes >= largest)

    def stream_loss(self, outputs: torch.Tensor, labels: torch.Tensor, task: int) -> torch.Tensor:
        """Cross-entropy of the stream batch over the unmasked logits (over all logits in the first task)."""
        allowed = self.stream_mask(labels)
        if self.uses_mask_and_replay(task):
            outputs = outputs.masked_fill(~allowed, torch.finfo(outputs.dtype).min)
        return F.cross_entropy(outputs, labels)

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        loss = self.stream_loss(self.net(inputs), labels, task)
        if self.uses_mask_and_replay(task) and not self.buffer.is_empty():
            replay = self.buffer.get_data(self.args.minibatch_size, transform=self.transform)
            loss = loss + self.loss(self.net(replay["examples"]), replay["labels"])
        self.buffer.add_data(not_aug_inputs, labels, indices=indices, task_labels=torch.full_like(indices, task))
        return loss
