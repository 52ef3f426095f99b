"""The gradient of λ‖θ − θ_ref‖², added in place: the same update as putting the penalty in the loss."""
from __future__ import annotations

import torch


@torch.no_grad()
def add_l2_gradient(params: list[torch.nn.Parameter], strength: float,
                    reference: list[torch.Tensor] | None = None) -> None:
    """grad += 2·strength·(θ − reference) for every parameter (reference 0 when None)."""
    if strength == 0 or not params:
        return
    for p in params:
        if p.grad is None:  # a parameter the loss did not reach still feels the penalty
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if reference is None:
        torch._foreach_add_(grads, params, alpha=2 * strength)
    else:
        torch._foreach_add_(grads, torch._foreach_sub(params, reference), alpha=2 * strength)
