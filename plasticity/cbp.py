"""cbp: continual backpropagation (Dohare et al., "Loss of plasticity in deep continual learning", Nature 2024).

Per unit, a running contribution utility u ← η·u + (1−η)·mean|h|·Σ_k|w_out,k|, bias-corrected by
1 − η^age (age = steps since the unit was born). Units older than the maturity threshold m are
eligible; each step a fractional count c += ρ·(number eligible) accumulates, and the ⌊c⌋ eligible
units of lowest corrected utility are reset. Expected resets per task: ρ · eligible units · steps,
logged as `cbp_expected_resets` beside the measured `resets`.
"""
from __future__ import annotations

import numpy as np
import torch

from plasticity import PlasticityMethod, register_plasticity


@register_plasticity("cbp")
class ContinualBackprop(PlasticityMethod):
    NEEDS_UNITS = True
    # ρ a replacement rate, m a number of steps, η a decay strictly inside (0, 1)
    BOUNDS = {"cbp_rho": "[0, 1]", "cbp_maturity": "[0, inf)", "cbp_decay": "(0, 1)"}

    @staticmethod
    def add_args(parser):
        parser.add_argument("--cbp_rho", type=float, default=1e-2,
                            help="replacement rate ρ per eligible unit and step (CNN: 3e-4; ViT sweep: 1e-2)")
        parser.add_argument("--cbp_maturity", type=int, default=100, help="maturity threshold m in steps")
        parser.add_argument("--cbp_decay", type=float, default=0.99, help="utility decay rate η")

    def __init__(self, net, optimizer, units, args):
        super().__init__(net, optimizer, units, args)
        groups = units.groups
        self.utility = [torch.zeros(g.n_units, device=units.resets[i].device) for i, g in enumerate(groups)]
        # Ages live on the host: the eligible count is then known without reading the device every step.
        self.age = [np.zeros(g.n_units, dtype=np.int64) for g in groups]
        self.count = [0.0] * len(groups)
        self.expected = 0.0

    def after_step(self, batch):
        eta, rho = self.args.cbp_decay, self.args.cbp_rho
        for i in range(len(self.units.groups)):
            contribution = self.units.monitor.mean_abs[i] * self.units.outgoing_weight_sum(i)
            self.utility[i].mul_(eta).add_(contribution, alpha=1 - eta)
            self.age[i] += 1
            eligible = self.age[i] > self.args.cbp_maturity
            n_eligible = int(eligible.sum())
            self.count[i] += rho * n_eligible
            self.expected += rho * n_eligible
            n_reset = min(int(self.count[i]), n_eligible)
            if n_reset == 0:
                continue
            self.count[i] -= n_reset
            device = self.utility[i].device
            age = torch.from_numpy(self.age[i]).to(device)
            corrected = self.utility[i] / (1 - eta ** age.double()).float()
            corrected = corrected.masked_fill(~torch.from_numpy(eligible).to(device), float("inf"))
            lowest = corrected.topk(n_reset, largest=False).indices
            self.units.reset(i, self.units.unit_mask(i, lowest))
            self.utility[i].index_fill_(0, lowest, 0.0)
            self.age[i][lowest.cpu().numpy()] = 0

    def task_metrics(self, task):
        expected, self.expected = self.expected, 0.0
        return {"cbp_expected_resets": expected}

    def state_dict(self):
        return {**super().state_dict(), "age": [torch.from_numpy(a) for a in self.age], "count": list(self.count)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.age = [a.numpy().copy() for a in state["age"]]
        self.count = list(state["count"])
