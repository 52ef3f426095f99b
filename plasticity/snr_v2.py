"""snr_v2: SNR with ages counted in tokens (inputs × positions), the seed experiments' fix for ViTs.

In a ViT step of B images × T tokens nearly every unit fires on some token, so step-counted ages
(snr) stay 0. Here a silent step adds its B·T tokens to the age, and a step where the unit fires on
n of its B·T tokens sets the age to B·T / n, the mean gap between firings. λ̂_i = Σ positive tokens /
Σ tokens since the last estimate (starting from one positive token in one token), and with
probability `--snr2_update_prob` per step τ_i = ⌈−ln(1 − p)/λ̂_i⌉, without SNR's doubling. A unit is
reset when its age reaches τ_i; thresholds start infinite, so no unit is reset before the first estimate.
"""
from __future__ import annotations

import math

import torch

from plasticity import PlasticityMethod, register_plasticity
from plasticity.snr import check_snr, infinite_thresholds, threshold_median


@register_plasticity("snr_v2")
class SNRV2(PlasticityMethod):
    NEEDS_UNITS = True
    STATE = ("tau", "positive_tokens", "tokens")

    @staticmethod
    def add_args(parser):
        parser.add_argument("--snr2_p", type=float, default=0.55,
                            help="reset percentile p (grid .5, .55, .6, .65; seed ViT L3 lr 1e-3: .55)")
        parser.add_argument("--snr2_update_prob", type=float, default=1 / (0.75 * 120),
                            help="probability per step of re-estimating the thresholds (seed ViT L3: k = .75 "
                                 "of 120 steps per task)")

    @staticmethod
    def check_args(args):
        check_snr(args.snr2_p, args.snr2_update_prob, "snr2")

    def __init__(self, net, optimizer, units, args):
        super().__init__(net, optimizer, units, args)
        self.tau = infinite_thresholds(units)
        self.positive_tokens = [torch.ones_like(t) for t in self.tau]
        self.tokens = [torch.ones_like(t) for t in self.tau]

    def after_step(self, step):
        monitor = self.units.monitor
        for i in range(len(self.units.groups)):
            self.positive_tokens[i] += monitor.step_positive[i]
            self.tokens[i] += monitor.step_positions[i]
            self.units.reset(i, monitor.age_tokens[i] >= self.tau[i])
        if float(torch.rand(())) < self.args.snr2_update_prob:
            quantile = -math.log(1 - self.args.snr2_p)
            for i in range(len(self.tau)):
                self.tau[i] = torch.ceil(quantile * self.tokens[i] / self.positive_tokens[i])
                self.positive_tokens[i].fill_(1.0)
                self.tokens[i].fill_(1.0)

    def task_metrics(self, task):
        return {"snr2_threshold_median": threshold_median(self.tau)}
