"""gem: Gradient Episodic Memory (GEM).

D. Lopez-Paz, M. Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017.

Each finished task keeps an episodic memory. At every step the gradient g of the stream batch's loss
is compared with g_k, the gradient of the loss on the memory of each finished task k. If any g·g_k is
negative (the step would raise that task's memory loss to first order), g is replaced by GEM's
projection, computed through the dual quadratic program of the paper, as in the GEM authors' code and
Mammoth's gem:

    v* = argmin_v  ½ vᵀ (M Mᵀ + ε I) v + (M g)ᵀ v   subject to  v ≥ γ,        g̃ = Mᵀ v* + g,

with M the matrix whose rows are the g_k, γ the --gamma margin (default 0.5, Mammoth's and the
authors' code's) and ε = 1e-3 on the diagonal, solved with `quadprog` in float64. With ε = 0 this g̃
is the vector nearest to g + γ Σ_k g_k among those with g̃·g_k ≥ 0 for every k (the paper's
projection, with γ pushing the step towards the memories' descent directions; γ = 0 gives exactly the
nearest vector to g). The projection runs in `after_backward`, between the task loop's backward pass
and its optimizer step; the memory's gradients are taken there, on the whole memory of each task with
the training augmentation (Mammoth's `get_data(buffer_size, transform)`) and the network in training
mode.

The memory is filled as in models/agem.py and the DER paper's Mammoth: at the end of each task,
--buffer_size // n_tasks examples drawn at random from the task's training data, unaugmented, are
offered to the buffer with their task label, so every task keeps an equal share. With a memorization
--buffer_policy (min, max, ... and --mem_scores) the policy chooses each task's share instead (the
replay contract's re-selection in models/__init__.py); GEM groups whatever the buffer holds by its
task labels. Mammoth at e75a491 fills GEM's buffer class-balanced instead (its `fill_buffer`:
buffer_size // seen classes per class, earlier classes cut down at each task); the gradient and the
projection given a memory are Mammoth's (benchmarks/mammoth_parity_gem_gss.py).

Mammoth computes the memory gradients before the stream batch's forward pass; here they follow it. The
gradients are the same; only the order in which BatchNorm's running statistics see the batches differs.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

from models import ContinualModel, register_model
from models._exemplars import check_task_share
from models.agem import flat_gradients, random_share, store_from_task, write_gradients
from utils.errors import ConfigError

DIAGONAL_EPS = 1e-3  # added to the memories' Gram matrix (Mammoth's project2cone2 and the GEM authors' code)


def project(g: torch.Tensor, memories: torch.Tensor, margin: float, eps: float = DIAGONAL_EPS) -> torch.Tensor:
    """GEM's update g̃ = Mᵀ v* + g from the dual QP min ½ vᵀ(M Mᵀ + εI)v + (Mg)ᵀv, v ≥ margin, for g [P] and
    the memories' gradients M [tasks, P]; solved in float64 on the CPU, returned in g's dtype and device."""
    import quadprog

    m = memories.detach().to("cpu", torch.float64).numpy()
    gv = g.detach().to("cpu", torch.float64).numpy()
    gram = m @ m.T
    gram = 0.5 * (gram + gram.T) + np.eye(len(m)) * eps
    v = quadprog.solve_qp(gram, -(m @ gv), np.eye(len(m)), np.full(len(m), float(margin)))[0]
    return torch.from_numpy(v @ m + gv).to(g.device, g.dtype)


@register_model("gem")
class Gem(ContinualModel):
    """Stream cross-entropy; the gradient is projected by GEM's QP against each finished task's memory."""

    USES_BUFFER = True
    BOUNDS = {"gamma": "[0, inf)"}

    @staticmethod
    def add_args(parser):
        parser.add_argument("--gamma", type=float, default=0.5,
                            help="margin γ of GEM's dual QP, v ≥ γ (Mammoth's gem and the GEM authors' "
                                 "memory_strength: 0.5)")

    @classmethod
    def check_args(cls, args):
        check_task_share(cls.NAME, args)
        if importlib.util.find_spec("quadprog") is None:
            raise ConfigError("gem solves its projection with quadprog, which is not installed; pip install "
                              "quadprog (it is in requirements.txt)")

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        return self.loss(self.net(inputs), labels)

    def memory_gradients(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """[tasks in the memory, P]: the gradient of the cross-entropy on each task's whole memory (leaves .grad
        alone), in the order of the task labels."""
        memory = self.buffer.get_all()
        examples = self.transform(memory["examples"])
        rows = []
        for t in torch.unique(memory["task_labels"]):
            mine = memory["task_labels"] == t
            loss = self.loss(self.net(examples[mine]), memory["labels"][mine])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            rows.append(torch.cat([(d if d is not None else torch.zeros_like(p)).reshape(-1)
                                   for d, p in zip(grads, params)]))
        return torch.stack(rows)

    def after_backward(self, task):
        if self.buffer.is_empty():
            return
        params = [p for p in self.net.parameters() if p.requires_grad]
        g = flat_gradients(params)
        memories = self.memory_gradients(params)
        if bool((memories @ g < 0).any()):  # one host sync a step, as the QP runs on the CPU anyway
            write_gradients(params, project(g, memories, self.args.gamma))

    @torch.no_grad()
    def end_task(self, task):
        store_from_task(self, task, random_share(self))
