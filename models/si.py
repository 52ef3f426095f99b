"""si: Synaptic Intelligence.

F. Zenke, B. Poole, S. Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017.

Each parameter's contribution to the decrease of the loss is accumulated along the training path,
ω += g · (θ_before − θ_after) at every optimizer step, g the gradient of the stream loss alone at
θ_before. At the end of a task the importance grows by Ω += ω / ((θ − θ_start)² + ξ), θ_start the
parameters at the start of the task, which becomes the anchor θ*; ω restarts from 0. Later steps add
the gradient of the surrogate loss c Σ Ω (θ − θ*)², 2 c Ω (θ − θ*), to the loss's gradient, and, as in
Mammoth's si, every gradient entry is then clipped to [−1, 1]; the returned loss is the stream
cross-entropy alone, as in Mammoth.

The task loop owns the step, so the path integral is taken around it: `after_backward` (after the
backward pass) records g and θ_before, and `after_step`, which the task loop sends right after the
optimizer step and before the plasticity methods act, adds g · (θ_before − θ_after).
"""
from __future__ import annotations

import torch
from torch.nn.utils import clip_grad_value_, parameters_to_vector

from models import ContinualModel, register_model

CLIP_VALUE = 1.0  # Mammoth's si clips every gradient entry to [-1, 1] before the step


@register_model("si")
class SI(ContinualModel):
    """Stream cross-entropy; the path integral is taken around each step and the surrogate's gradient added."""

    BOUNDS = {"c": "[0, inf)", "xi": "(0, inf)"}  # ξ > 0 keeps Ω finite where a weight did not move

    @staticmethod
    def add_args(parser):
        parser.add_argument("--c", "--si_c", dest="c", type=float, default=0.5,
                            help="weight c of the surrogate loss c Σ Ω (θ − θ*)² (Mammoth's si --c; "
                                 "DER paper, seq-cifar10: 0.5)")
        parser.add_argument("--xi", type=float, default=1.0,
                            help="damping ξ of the importance Ω += ω / (Δθ² + ξ) (Mammoth's si; DER paper, "
                                 "seq-cifar10: 1)")

    def __init__(self, backbone, dataset, args):
        super().__init__(backbone, dataset, args)
        self.params = list(self.net.parameters())
        self.anchor = self.flat_params().clone()  # θ at the start of the task (θ*)
        self.path = torch.zeros_like(self.anchor)  # ω of the current task
        self.importance: torch.Tensor | None = None  # Ω, from the first end_task on
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (g, θ_before) of the step under way

    def flat_params(self) -> torch.Tensor:
        return parameters_to_vector(p.detach() for p in self.params)

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        return self.loss(self.net(inputs), labels)

    def penalty_gradient(self) -> torch.Tensor:
        """2 c Ω (θ − θ*), as one vector."""
        return 2 * self.args.c * self.importance * (self.flat_params() - self.anchor)

    def after_backward(self, task):
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        self.pending = (grads.clone(), self.flat_params().clone())
        if self.importance is not None:
            total = grads + self.penalty_gradient()
            offset = 0
            for p in self.params:
                chunk = total[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)
        clip_grad_value_(self.params, CLIP_VALUE)

    def after_step(self, batch):
        """ω += g · (θ_before − θ_after)."""
        if self.pending is None:  # a step not prepared by after_backward (none in the task loop)
            return
        grads, before = self.pending
        self.pending = None
        self.path += grads * (before - self.flat_params())

    @torch.no_grad()
    def end_task(self, task):
        theta = self.flat_params()
        gained = self.path / ((theta - self.anchor) ** 2 + self.args.xi)
        self.importance = gained if self.importance is None else self.importance + gained
        self.anchor = theta.clone()
        self.path = torch.zeros_like(theta)
