"""ewc_on: online Elastic Weight Consolidation.

J. Schwarz, W. Czarnecki, J. Luketina, A. Grabska-Barwinska, Y. W. Teh, R. Pascanu, R. Hadsell,
"Progress & Compress: A scalable framework for continual learning", ICML 2018 (online EWC; EWC is
Kirkpatrick et al., PNAS 2017).

At the end of each task, as in Mammoth's ewc_on, the diagonal Fisher information is estimated on the
task's training data (with the training augmentation): the mean over the examples of
p(y|x) · (∂ log p(y|x) / ∂θ)², y the example's label. The running Fisher becomes F ← γ F + F_task and
the anchor θ* the parameters now. Later steps add the gradient of the penalty λ Σ F (θ − θ*)²,
2 λ F (θ − θ*), to the loss's gradient in `after_backward` (the scale of Mammoth's penalty, which its
published λ values assume); the returned loss is the stream cross-entropy alone, as in Mammoth.

The per-example gradients are computed in batches (torch.func) with the network in evaluation mode, so
batch normalisation uses its running statistics and the estimate leaves them untouched (Mammoth's loop
over single examples runs in training mode). The mean is over the task's examples; Mammoth divides the
sum by the number of batches times the batch size, which exceeds it when the last batch is partial.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from models import ContinualModel, register_model

PER_EXAMPLE_FLOATS = 2 ** 27  # budget of per-example gradient entries held at once (512 MiB in float32)
MAX_CHUNK = 256


def fisher_diagonal(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    transform: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Mean over the examples of p(y|x) (∂ log p(y|x)/∂θ)², one tensor per parameter of `net`, computed in
    batches of per-example gradients of the transformed images, with the network in evaluation mode."""
    names = [n for n, _ in net.named_parameters()]
    params = {n: p.detach() for n, p in net.named_parameters()}
    buffers = dict(net.named_buffers())

    def log_likelihood(params, x, y):
        out = functional_call(net, (params, buffers), (x.unsqueeze(0),))
        return F.log_softmax(out, dim=1)[0].gather(0, y.unsqueeze(0)).squeeze(0)

    per_example = vmap(grad_and_value(log_likelihood), in_dims=(None, 0, 0))
    n_params = sum(p.numel() for p in params.values())
    chunk = max(1, min(MAX_CHUNK, PER_EXAMPLE_FLOATS // max(n_params, 1)))
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = net.training
    net.eval()
    for start in range(0, len(labels), chunk):
        x = transform(images[start:start + chunk])
        grads, log_p = per_example(params, x, labels[start:start + chunk])
        weight = log_p.exp()
        for n in names:
            fisher[n] += torch.tensordot(weight, grads[n] ** 2, dims=1)
    net.train(was_training)
    return [fisher[n] / len(labels) for n in names]


@register_model("ewc_on")
class EwcOn(ContinualModel):
    """Stream cross-entropy; the online-EWC penalty's gradient is added in `after_backward`."""

    BOUNDS = {"e_lambda": "[0, inf)", "gamma": "[0, 1]"}  # γ weighs the earlier tasks' Fisher

    @staticmethod
    def add_args(parser):
        parser.add_argument("--e_lambda", type=float, default=10.0,
                            help="weight λ of the penalty λ Σ F (θ − θ*)² (Mammoth's ewc_on; DER paper, "
                                 "seq-cifar10: 10)")
        parser.add_argument("--gamma", type=float, default=1.0,
                            help="decay γ of the running Fisher, F ← γ F + F_task (Mammoth's ewc_on; DER paper: 1)")

    def __init__(self, backbone, dataset, args):
        super().__init__(backbone, dataset, args)
        self.fisher: list[torch.Tensor] | None = None
        self.anchor: list[torch.Tensor] | None = None

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        return self.loss(self.net(inputs), labels)

    def penalty_gradients(self) -> list[torch.Tensor]:
        """2 λ F (θ − θ*), per parameter."""
        return [2 * self.args.e_lambda * f * (p.detach() - a)
                for p, f, a in zip(self.net.parameters(), self.fisher, self.anchor)]

    def after_backward(self, task):
        if self.fisher is None:
            return
        for p, extra in zip(self.net.parameters(), self.penalty_gradients()):
            if p.grad is None:
                p.grad = extra
            else:
                p.grad.add_(extra)

    def end_task(self, task):
        data = self.training_data(task)
        fisher = fisher_diagonal(self.net, data.images, data.labels, self.transform)
        if self.fisher is None:
            self.fisher = fisher
        else:
            self.fisher = [self.args.gamma * old + new for old, new in zip(self.fisher, fisher)]
        self.anchor = [p.detach().clone() for p in self.net.parameters()]
