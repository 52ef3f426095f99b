"""snr: Self-Normalized Resets (Farias & Jozefiak, ICLR 2025), as in the ViT study's reference code (V1).

Ages count steps: a unit fires in a step when any of its inputs × positions is > 0, and its age is
the number of steps since it last fired. A unit is reset when its age reaches its threshold τ_i.
Every firing (or reset) records an arrival, the age it ended plus one. With probability
`--snr_update_prob` per step every τ_i is re-estimated from the unit's arrivals since the last
estimate, λ̂_i = arrivals / Σ arrival times: τ* = −ln(1 − p)/λ̂_i (the p-quantile of an exponential
inter-firing time); τ_i doubles if it was at most τ*, else becomes ⌈τ*⌉. Thresholds start infinite, so
no unit is reset before the first estimate; the arrival counts start at one arrival of one step.
"""
from __future__ import annotations

import torch

from plasticity import register_plasticity
from plasticity._snr_base import SelfNormalizedResets

EXPANSION = 2.0  # the ViT code's threshold_expansion_factor


@register_plasticity("snr")
class SNR(SelfNormalizedResets):
    P_FLAG, UPDATE_FLAG = "snr_p", "snr_update_prob"
    BOUNDS = {"snr_p": "(0, 1)", "snr_update_prob": "(0, 1]"}  # a percentile, a probability

    @staticmethod
    def add_args(parser):
        parser.add_argument("--snr_p", type=float, default=0.84,
                            help="reset percentile p (grid .99 … .68; ViT study, L3 lr 1e-3: .84)")
        parser.add_argument("--snr_update_prob", type=float, default=1 / (4 * 120),
                            help="probability per step of re-estimating the thresholds (1/(k·steps per task); "
                                 "ViT study, L3: k = 4 of 120 steps)")

    def __init__(self, net, optimizer, units, args):
        super().__init__(net, optimizer, units, args)
        self.arrival_sum = [torch.ones_like(t) for t in self.tau]
        self.arrival_count = [torch.ones_like(t) for t in self.tau]

    def ages(self, index):
        return self.units.monitor.age_steps[index]

    def observe_step(self, index):
        monitor = self.units.monitor
        age = monitor.age_steps[index]
        arrived = (age == 0) | (age >= self.tau[index])  # a firing, or a reset about to happen
        self.arrival_sum[index] += (monitor.previous_age_steps[index] + 1) * arrived
        self.arrival_count[index] += arrived

    def estimate(self, index):
        target = self.quantile * self.arrival_sum[index] / self.arrival_count[index]  # −ln(1−p)/λ̂
        tau = self.tau[index]
        self.tau[index] = torch.where(tau <= target, torch.ceil(EXPANSION * tau), torch.ceil(target))
        self.arrival_sum[index].fill_(1.0)
        self.arrival_count[index].fill_(1.0)
