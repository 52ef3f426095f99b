"""redo: Recycling Dormant neurons (Sokar et al., "The dormant neuron phenomenon in deep RL", ICML 2023).

Score s_i = mean|h_i| / (mean over the layer's units of mean|h_k|), over the step's inputs and
positions, so the layer mean of s is 1; a unit is dormant when s_i ≤ τ (τ = 0 resets dead units only).
Dormant units are reset every F steps (`--redo_every`), or at each step with a probability
(`--redo_prob`, the ViT study's sweep's "once every k tasks" as 1/(k·steps per task)).
Normalising by the layer *sum* instead of the mean (one public ViT implementation does) turns τ
into a threshold that nearly every unit falls under; this uses the mean, as the paper.
"""
from __future__ import annotations

import torch

from plasticity import PlasticityMethod, register_plasticity
from utils.errors import ConfigError


def redo_scores(mean_abs: torch.Tensor) -> torch.Tensor:
    """s_i = mean|h_i| / layer mean; all zeros (every unit dormant) when the whole layer is silent."""
    layer_mean = mean_abs.mean()
    return torch.where(layer_mean > 0, mean_abs / layer_mean.clamp(min=torch.finfo(mean_abs.dtype).tiny), 0.0)


@register_plasticity("redo")
class ReDO(PlasticityMethod):
    NEEDS_UNITS = True

    @staticmethod
    def add_args(parser):
        parser.add_argument("--redo_tau", type=float, default=0.025,
                            help="dormancy threshold τ on the mean-normalised score (paper: 0.025, 0.1; 0 = dead)")
        parser.add_argument("--redo_every", type=int, default=1000, help="reset dormant units every F steps")
        parser.add_argument("--redo_prob", type=float, default=None,
                            help="instead of --redo_every: check at each step with this probability")

    @staticmethod
    def check_args(args):
        if args.redo_tau < 0:
            raise ConfigError(f"--redo_tau cannot be negative, got {args.redo_tau}")
        if args.redo_every < 1:
            raise ConfigError(f"--redo_every must be at least 1 step, got {args.redo_every}")
        if args.redo_prob is not None and not 0 < args.redo_prob <= 1:
            raise ConfigError(f"--redo_prob is a probability in (0, 1], got {args.redo_prob}")

    def after_step(self, step):
        if self.args.redo_prob is not None:
            due = float(torch.rand(())) < self.args.redo_prob
        else:
            due = (step + 1) % self.args.redo_every == 0
        if not due:
            return
        for i in range(len(self.units.groups)):
            dormant = redo_scores(self.units.monitor.mean_abs[i]) <= self.args.redo_tau
            self.units.reset(i, dormant)
