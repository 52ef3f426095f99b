"""snr_v2: SNR with ages counted in tokens (inputs × positions), the ViT study's fix for ViTs.

In a ViT step of B images × T tokens nearly every unit fires on some token, so step-counted ages
(snr) stay 0. Here a silent step adds its B·T tokens to the age, and a step where the unit fires on
n of its B·T tokens sets the age to B·T / n, the mean gap between firings. λ̂_i = Σ positive tokens /
Σ tokens since the last estimate (starting from one positive token in one token), and with
probability `--snr2_update_prob` per step τ_i = ⌈−ln(1 − p)/λ̂_i⌉, without SNR's doubling. A unit is
reset when its age reaches τ_i; thresholds start infinite, so no unit is reset before the first estimate.
"""
from __future__ import annotations

import torch

from plasticity import register_plasticity
from plasticity._snr_base import SelfNormalizedResets


@register_plasticity("snr_v2")
class SNRV2(SelfNormalizedResets):
    P_FLAG, UPDATE_FLAG = "snr2_p", "snr2_update_prob"
    BOUNDS = {"snr2_p": "(0, 1)", "snr2_update_prob": "(0, 1]"}  # a percentile, a probability

    @staticmethod
    def add_args(parser):
        parser.add_argument("--snr2_p", type=float, default=0.55,
                            help="reset percentile p (grid .5, .55, .6, .65; ViT study, L3 lr 1e-3: .55)")
        parser.add_argument("--snr2_update_prob", type=float, default=1 / (0.75 * 120),
                            help="probability per step of re-estimating the thresholds (ViT study, L3: k = .75 "
                                 "of 120 steps per task)")

    def __init__(self, net, optimizer, units, args):
        super().__init__(net, optimizer, units, args)
        self.positive_tokens = [torch.ones_like(t) for t in self.tau]
        self.tokens = [torch.ones_like(t) for t in self.tau]

    def ages(self, index):
        return self.units.monitor.age_tokens[index]

    def observe_step(self, index):
        self.positive_tokens[index] += self.units.monitor.step_positive[index]
        self.tokens[index] += self.units.monitor.step_positions[index]

    def estimate(self, index):
        self.tau[index] = torch.ceil(self.quantile * self.tokens[index] / self.positive_tokens[index])
        self.positive_tokens[index].fill_(1.0)
        self.tokens[index].fill_(1.0)
