"""What L2 and L2Init share: the gradient of λ‖θ − θ_ref‖², added before the optimizer step (the same
update as putting the penalty in the loss)."""
from __future__ import annotations

import torch

from plasticity import PlasticityMethod


class L2Penalty(PlasticityMethod):
    """Subclasses name their λ flag (LAMBDA_FLAG), bound it in BOUNDS ("[0, inf)") and set `self.params` and
    `self.reference` (None: 0)."""

    LAMBDA_FLAG: str

    def __init__(self, net, optimizer, units, args):
        super().__init__(net, optimizer, units, args)
        self.params: list[torch.nn.Parameter] = list(net.parameters())
        self.reference: list[torch.Tensor] | None = None

    @torch.no_grad()
    def after_backward(self, task):
        """grad += 2·λ·(θ − reference) for every parameter."""
        strength = getattr(self.args, self.LAMBDA_FLAG)
        if strength == 0 or not self.params:
            return
        for p in self.params:
            if p.grad is None:  # a parameter the loss did not reach still feels the penalty
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        if self.reference is None:
            torch._foreach_add_(grads, self.params, alpha=2 * strength)
        else:
            torch._foreach_add_(grads, torch._foreach_sub(self.params, self.reference), alpha=2 * strength)
