"""What SNR and SNR-V2 share: a threshold τ_i per unit, infinite until the first estimate, re-estimated
with a probability per step; a unit is reset when its age reaches τ_i."""
from __future__ import annotations

import math

import torch

from plasticity import PlasticityMethod


class SelfNormalizedResets(PlasticityMethod):
    """Subclasses name their flags (P_FLAG, UPDATE_FLAG) and bound them in BOUNDS (the percentile p in
    (0, 1), the probability in (0, 1]), count arrivals in `observe_step`, return the ages compared with τ
    from `ages`, and set τ from their counts in `estimate`."""

    NEEDS_UNITS = True
    P_FLAG: str
    UPDATE_FLAG: str

    def __init__(self, net, optimizer, units, args):
        super().__init__(net, optimizer, units, args)
        # No unit is reset before the first estimate.
        self.tau = [torch.full((g.n_units,), math.inf, device=r.device) for g, r in zip(units.groups, units.resets)]
        self.quantile = -math.log(1 - getattr(args, self.P_FLAG))  # −ln(1 − p): τ* = quantile / λ̂

    def observe_step(self, index: int) -> None:
        """Count group `index`'s arrivals of the step just taken (before any reset)."""
        raise NotImplementedError

    def ages(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def estimate(self, index: int) -> None:
        """New thresholds of group `index` from the counts since the last estimate, which restart."""
        raise NotImplementedError

    def after_step(self, batch):
        for i in range(len(self.units.groups)):
            self.observe_step(i)
            self.units.reset(i, self.ages(i) >= self.tau[i])
        if float(torch.rand(())) < getattr(self.args, self.UPDATE_FLAG):
            self.update_thresholds()

    def update_thresholds(self) -> None:
        for i in range(len(self.tau)):
            self.estimate(i)

    def task_metrics(self, task):
        """The median threshold over all units, once there is an estimate: before it every τ_i is infinite,
        and an infinite value would be stored as 1.8e308 by MLflow, so nothing is logged."""
        finite = torch.cat([t[torch.isfinite(t)] for t in self.tau])
        if not len(finite):
            return {}
        return {f"{self.P_FLAG.removesuffix('_p')}_threshold_median": float(finite.median())}
