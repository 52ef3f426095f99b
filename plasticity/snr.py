"""snr: Self-Normalized Resets (Farias & Jozefiak, ICLR 2025), as in the seed experiments' ViT code (V1).

Ages count steps: a unit fires in a step when any of its inputs × positions is > 0, and its age is
the number of steps since it last fired. A unit is reset when its age reaches its threshold τ_i.
Every firing (or reset) records an arrival, the age it ended plus one. With probability
`--snr_update_prob` per step every τ_i is re-estimated from the unit's arrivals since the last
estimate, λ̂_i = arrivals / Σ arrival times: τ* = −ln(1 − p)/λ̂_i (the p-quantile of an exponential
inter-firing time); τ_i doubles if it was at most τ*, else becomes ⌈τ*⌉. Thresholds start infinite, so
no unit is reset before the first estimate; the arrival counts start at one arrival of one step.
"""
from __future__ import annotations

import math

import torch

from plasticity import PlasticityMethod, register_plasticity
from utils.errors import ConfigError

EXPANSION = 2.0  # the ViT code's threshold_expansion_factor


def infinite_thresholds(units) -> list[torch.Tensor]:
    """One threshold per unit, infinite until the first estimate (no reset before it)."""
    return [torch.full((g.n_units,), math.inf, device=r.device) for g, r in zip(units.groups, units.resets)]


def threshold_median(tau: list[torch.Tensor]) -> float:
    """Median of the finite thresholds over all groups (inf while none was estimated)."""
    finite = torch.cat([t[torch.isfinite(t)] for t in tau])
    return float(finite.median()) if len(finite) else math.inf


def check_snr(p: float, update_prob: float, prefix: str) -> None:
    if not 0 < p < 1:
        raise ConfigError(f"--{prefix}_p is a percentile in (0, 1), got {p}")
    if not 0 < update_prob <= 1:
        raise ConfigError(f"--{prefix}_update_prob is a probability in (0, 1], got {update_prob}")


@register_plasticity("snr")
class SNR(PlasticityMethod):
    NEEDS_UNITS = True
    STATE = ("tau", "arrival_sum", "arrival_count")

    @staticmethod
    def add_args(parser):
        parser.add_argument("--snr_p", type=float, default=0.84,
                            help="reset percentile p (grid .99 … .68; seed ViT L3 lr 1e-3: .84)")
        parser.add_argument("--snr_update_prob", type=float, default=1 / (4 * 120),
                            help="probability per step of re-estimating the thresholds (1/(k·steps per task); "
                                 "seed ViT L3: k = 4 of 120 steps)")

    @staticmethod
    def check_args(args):
        check_snr(args.snr_p, args.snr_update_prob, "snr")

    def __init__(self, net, optimizer, units, args):
        super().__init__(net, optimizer, units, args)
        self.tau = infinite_thresholds(units)
        self.arrival_sum = [torch.ones_like(t) for t in self.tau]
        self.arrival_count = [torch.ones_like(t) for t in self.tau]

    def after_step(self, step):
        monitor = self.units.monitor
        for i in range(len(self.units.groups)):
            age = monitor.age_steps[i]
            fired = age == 0
            reset = age >= self.tau[i]
            arrived = fired | reset
            self.arrival_sum[i] += (monitor.previous_age_steps[i] + 1) * arrived
            self.arrival_count[i] += arrived
            self.units.reset(i, reset)
        if float(torch.rand(())) < self.args.snr_update_prob:
            self.update_thresholds()

    def update_thresholds(self):
        quantile = -math.log(1 - self.args.snr_p)
        for i in range(len(self.tau)):
            target = quantile * self.arrival_sum[i] / self.arrival_count[i]  # −ln(1−p)/λ̂
            self.tau[i] = torch.where(self.tau[i] <= target, torch.ceil(EXPANSION * self.tau[i]), torch.ceil(target))
            self.arrival_sum[i].fill_(1.0)
            self.arrival_count[i].fill_(1.0)

    def task_metrics(self, task):
        return {"snr_threshold_median": threshold_median(self.tau)}
