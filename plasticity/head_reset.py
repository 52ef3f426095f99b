"""head_reset: the output layer starts afresh at every task after the first.

Dohare et al. (Nature 2024), continual ImageNet: "the output layer is zeroed at the start of each
task", so a binary task's two output units start from the same point whatever the previous task
learnt. `--head_reset_mode redraw` draws it anew from the backbone's initialisation instead. Either
way the optimizer state of the head (momentum, Adam's moments) is cleared. It acts in `begin_task`,
before the model's own `begin_task` (so a method that warms up the head, as lwf does, warms up the
fresh one), and composes with every other plasticity method.
"""
from __future__ import annotations

import torch

from plasticity import register_plasticity, PlasticityMethod
from plasticity._hidden_units import Reinitializer, clear_optimizer_state


@register_plasticity("head_reset")
class HeadReset(PlasticityMethod):
    REFERENCES = (*PlasticityMethod.REFERENCES, "reinitializer")  # a scratch network: every use re-draws it

    @staticmethod
    def add_args(parser):
        parser.add_argument("--head_reset_mode", choices=("zero", "redraw"), default="zero",
                            help="zero: set the output layer to 0 (Dohare's protocol); redraw: draw it anew from "
                                 "the backbone's initialisation")

    def __init__(self, net, optimizer, units, args):
        super().__init__(net, optimizer, units, args)
        self.reinitializer = Reinitializer(net) if args.head_reset_mode == "redraw" else None
        self.resets = 0  # task boundaries at which the head was reset

    @torch.no_grad()
    def begin_task(self, task):
        if task == 0:
            return
        params = list(self.net.head.parameters())
        if self.reinitializer is None:
            for param in params:
                param.zero_()
        else:
            for param, fresh in zip(params, self.reinitializer.fresh(params)):
                param.copy_(fresh)
        for param in params:
            clear_optimizer_state(self.optimizer, param)
        self.resets += 1

    def task_metrics(self, task):
        return {"head_resets": float(self.resets)}
