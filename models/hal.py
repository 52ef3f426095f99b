"""hal: Hindsight Anchor Learning (HAL).

A. Chaudhry, A. Gordo, P. K. Dokania, P. H. S. Torr, D. Lopez-Paz, "Using Hindsight to Anchor Past
Knowledge in Continual Learning", AAAI 2021.

Experience replay whose step also keeps the network's outputs on a few learned inputs, the anchors
(one per class), from moving. Each step, as in Mammoth's hal:

- ℓ = cross-entropy over the stream batch with a replay batch (--minibatch_size) appended;
- a look-ahead θ̃ = θ − lr ∇ℓ(θ) and the anchor term λ mean((f_θ̃(e) − f_θ(e))²) over the anchors e of the
  tasks so far, with f_θ̃(e) held constant (λ = --hal_lambda);
- the task loop's step minimises ℓ + λ · anchor term at θ, so the update is θ − lr (∇ℓ + λ ∇anchor);
- φ, a running mean of the penultimate features of the stream batches: after every step
  φ ← β φ + (1 − β) mean features(batch) (β = --beta), restarted at 0 with every task.

At the end of a task the anchors of its classes are learned: a copy of the network is fine-tuned on the
buffer (θ_m; --finetuning_epochs SGD steps at --lr, each on one buffer batch of --batch_size: Mammoth's
"epochs" are single batches), and each class c gets an anchor e, drawn uniformly in [0, 1) in the input
space the network sees, then --steps_on_anchors SGD steps at --lr on
−CE(f_θm(e), c) + CE(f_θ(e), c) + γ ‖features_θ(e) − φ‖²  (γ = --gamma):
the point the fine-tuning would forget most, kept typical of the task by φ. The copies are dropped after;
the anchors and φ are the method's state.

Where this differs from Mammoth (commit e75a491): its get_anchors sets the spare network's parameters
to θ through `vector_to_parameters`, which makes them views of that vector, so the fine-tuning step
writes into it and θ becomes θ_m: the two cross-entropies cancel and its anchors follow the φ term alone.
Here θ is the network at the end of the task, as in the paper (Mammoth with that aliasing removed
gives the same anchors, tests/test_method_hal.py). Mammoth takes the look-ahead with its optimizer
(which also advances momentum twice a batch); here it is the paper's plain gradient step, the same for
SGD without momentum or weight decay (Mammoth's defaults and its best configurations). Mammoth's hal
fills a ring buffer (the most recent --buffer_size // n_tasks stream examples of each task); here the
stream batches are offered to this repository's buffer, placed by --buffer_policy (reservoir by default;
the memorization policies re-select it at task boundaries): its `get_data` draws from slots [0, len),
where per-task rings would leave unfilled gaps, and the rings would overwrite a policy's per-class
layout. The anchor passes run in training mode, as in Mammoth (BatchNorm statistics included).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from models import ContinualModel, register_model


def lookahead(net: nn.Module, loss: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
    """θ − lr ∇loss for every trainable parameter (detached); the graph of `loss` is kept for the step."""
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return {n: p.detach() if g is None else p.detach() - lr * g for (n, p), g in zip(named, grads)}


def frozen(net: nn.Module) -> nn.Module:
    """A training-mode copy of the network without parameter gradients (only the anchor is optimised)."""
    clone = copy.deepcopy(net)
    clone.train()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


@register_model("hal")
class Hal(ContinualModel):
    """ER plus the anchor term; anchors learned at the end of each task."""

    USES_BUFFER = True
    BOUNDS = {"hal_lambda": "[0, inf)", "beta": "[0, 1]", "gamma": "[0, inf)", "steps_on_anchors": "[0, inf)",
              "finetuning_epochs": "[0, inf)"}

    @staticmethod
    def add_args(parser):
        parser.add_argument("--hal_lambda", type=float, default=0.1,
                            help="weight of the anchor term, the squared change of the anchors' outputs under the "
                                 "look-ahead step (Mammoth's hal)")
        parser.add_argument("--beta", type=float, default=0.5,
                            help="hal: decay of φ, the running mean of the task's features (Mammoth's hal)")
        parser.add_argument("--gamma", type=float, default=0.1,
                            help="hal: weight of ‖features(anchor) − φ‖² when the anchors are learned (Mammoth's hal)")
        parser.add_argument("--steps_on_anchors", type=int, default=100,
                            help="SGD steps (at --lr) that learn each anchor (Mammoth's hal: 100)")
        parser.add_argument("--finetuning_epochs", type=int, default=1,
                            help="hal: SGD steps, each on one buffer batch of --batch_size, that fine-tune the copy "
                                 "whose forgetting the anchors maximise (Mammoth's hal: 1)")

    def __init__(self, backbone, dataset, args):
        super().__init__(backbone, dataset, args)
        self.anchors: torch.Tensor | None = None  # [anchors, *input shape], in the order their classes were learned
        self.anchor_labels: torch.Tensor | None = None
        self.phi: torch.Tensor | None = None  # running mean of the current task's features
        self.input_shape: tuple | None = None  # of the network's inputs, for drawing anchors

    def begin_task(self, task):
        self.phi = None

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        self.input_shape = tuple(inputs.shape[1:])
        stream_labels = labels
        if not self.buffer.is_empty():
            replay = self.buffer.get_data(self.args.minibatch_size, transform=self.transform)
            inputs = torch.cat((inputs, replay["examples"]))
            labels = torch.cat((labels, replay["labels"]))
        loss = self.loss(self.net(inputs), labels)
        if self.anchors is not None:
            loss = loss + self.args.hal_lambda * self.anchor_loss(loss)
        self.buffer.add_data(not_aug_inputs, stream_labels, indices=indices,
                             task_labels=torch.full_like(indices, task))
        return loss

    def anchor_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """mean((f_θ̃(e) − f_θ(e))²) over the anchors, θ̃ the look-ahead of `loss`, f_θ̃(e) held constant."""
        with torch.no_grad():
            ahead = functional_call(self.net, lookahead(self.net, loss, self.args.lr), (self.anchors,))
        return (ahead - self.net(self.anchors)).pow(2).mean()

    @torch.no_grad()
    def after_step(self, batch):
        features = self.net.features(batch.inputs).mean(0)
        if self.phi is None:
            self.phi = torch.zeros_like(features)
        self.phi = self.args.beta * self.phi + (1 - self.args.beta) * features

    def end_task(self, task):
        if self.input_shape is not None:  # a task without a batch has nothing to anchor
            self.learn_anchors(list(self.dataset.task_classes(task)))
        self.phi = None

    def fine_tuned(self) -> nn.Module:
        """θ_m: a copy of the network after --finetuning_epochs SGD steps on buffer batches of --batch_size."""
        spare = copy.deepcopy(self.net)
        spare.train()
        opt = torch.optim.SGD(spare.parameters(), lr=self.args.lr)
        for _ in range(self.args.finetuning_epochs if not self.buffer.is_empty() else 0):
            replay = self.buffer.get_data(self.args.batch_size, transform=self.transform)
            opt.zero_grad()
            self.loss(spare(replay["examples"]), replay["labels"]).backward()
            opt.step()
        return spare

    def learn_anchors(self, classes: list[int]) -> None:
        """One anchor per class: gradient descent on −CE(θ_m) + CE(θ) + γ‖features_θ − φ‖² from U[0, 1)."""
        # Drawn before the fine-tuning's buffer draws, one class after another (Mammoth's draws, in its order).
        starts = [torch.rand(self.input_shape, device=self.device) for _ in classes]
        tuned, current = self.fine_tuned(), frozen(self.net)
        for p in tuned.parameters():
            p.requires_grad_(False)
        phi = self.phi
        learned = []
        for c, start in zip(classes, starts):
            anchor = start.clone().requires_grad_(True)
            opt = torch.optim.SGD([anchor], lr=self.args.lr)
            target = torch.tensor([c], device=self.device)
            for _ in range(self.args.steps_on_anchors):
                opt.zero_grad()
                x = anchor.unsqueeze(0)
                features = current.features(x)
                if phi is None:  # no step in this task
                    phi = torch.zeros_like(features[0])
                forgetting = (-F.cross_entropy(tuned(x), target) + F.cross_entropy(current.head(features), target)
                              + self.args.gamma * (features - phi).pow(2).sum())
                forgetting.backward()
                opt.step()
            learned.append(anchor.detach())
        new = torch.stack(learned)
        labels = torch.tensor(classes, device=self.device)
        self.anchors = new if self.anchors is None else torch.cat((self.anchors, new))
        self.anchor_labels = labels if self.anchor_labels is None else torch.cat((self.anchor_labels, labels))
