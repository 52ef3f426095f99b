"""parseval: loss + λ·Σ_l (64/n_l)²·‖W_l W_lᵀ − s·I‖²_F over the hidden layers' weight matrices (Chung, Cherif,
Precup, Meger, NeurIPS 2024, "Parseval Regularization for Continual Reinforcement Learning").

W_l is layer l's incoming weight matrix with one row per hidden unit (n_l rows; a convolution's kernel flattened
to [channels, in·k·k]); s is the squared gain of the orthogonal initialisation the rows are kept near (2 for
ReLU), and (64/n_l)² the authors' width scaling (their λ is set for 64 units). The output head is left alone,
as in the authors' code. The gradient, 4·λ·(64/n_l)²·(W Wᵀ − s·I)·W, is added before the optimizer step (the
same update as putting the penalty in the loss).
"""
from __future__ import annotations

import torch

from plasticity import PlasticityMethod, register_plasticity


def hidden_weight_matrices(net) -> list[torch.nn.Parameter]:
    """The incoming weight tensors of every hidden-unit group (two or more dimensions: no bias or norm scale),
    each once, with the units along their first axis."""
    chosen, seen = [], set()
    for group in net.hidden_units():
        for param, axis in group.incoming:
            if param.dim() >= 2 and axis == 0 and id(param) not in seen:
                seen.add(id(param))
                chosen.append(param)
    return chosen


def parseval_penalty(weights: list[torch.Tensor], scale: float) -> torch.Tensor:
    """Σ_l (64/n_l)²·‖W_l W_lᵀ − scale·I‖²_F (for tests and logging; the method adds its gradient directly)."""
    total = torch.zeros(())
    for w in weights:
        rows = w.reshape(w.shape[0], -1)
        gram = rows @ rows.T - scale * torch.eye(rows.shape[0], dtype=rows.dtype, device=rows.device)
        total = total + (64 / rows.shape[0]) ** 2 * gram.pow(2).sum()
    return total


@register_plasticity("parseval")
class Parseval(PlasticityMethod):
    BOUNDS = {"parseval_lambda": "[0, inf)", "parseval_scale": "(0, inf)"}

    @staticmethod
    def add_args(parser):
        parser.add_argument("--parseval_lambda", type=float, default=1e-3,
                            help="λ of the Parseval penalty (the authors' default, for 64-unit layers; scaled by "
                                 "(64/units)² per layer)")
        parser.add_argument("--parseval_scale", type=float, default=2.0,
                            help="s in W Wᵀ ≈ s·I: the squared gain of orthogonal initialisation (2 for ReLU)")

    def __init__(self, net, optimizer, units, args):
        super().__init__(net, optimizer, units, args)
        self.params: list[torch.nn.Parameter] = hidden_weight_matrices(net)

    @torch.no_grad()
    def after_backward(self, task):
        strength = self.args.parseval_lambda
        if strength == 0:
            return
        for p in self.params:
            rows = p.reshape(p.shape[0], -1)
            gram = rows @ rows.T
            gram.diagonal().sub_(self.args.parseval_scale)
            gradient = (gram @ rows).view_as(p)
            if p.grad is None:  # a layer the loss did not reach still feels the penalty
                p.grad = torch.zeros_like(p)
            p.grad.add_(gradient, alpha=4 * strength * (64 / rows.shape[0]) ** 2)
