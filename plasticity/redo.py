"""redo: Recycling Dormant neurons (Sokar et al., "The dormant neuron phenomenon in deep RL", ICML 2023).

Score s_i = mean|h_i| / (mean over the layer's units of mean|h_k|), over the inputs and positions of the
step's training batch, so the layer mean of s is 1; a unit is dormant when s_i ≤ τ (τ = 0 resets dead
units only). Dormant units are reset every F steps (`--redo_every`, counted over the whole run), or at
each step with a probability (`--redo_prob`, the ViT study's sweep's "once every k tasks" as
1/(k·steps per task)). Normalising by the layer *sum* instead of the mean (one public ViT implementation
does) turns τ into a threshold that nearly every unit falls under; this uses the mean, as the paper.

The score reads h_i as the paper defines it, the activation of unit i under an input x, so the check runs
the network in eval mode on the step's inputs (after the step's update), as the dormant-unit covariate
does. In train mode a BatchNorm gives every channel a batch mean of β_i and a batch std of |γ_i| whatever
its incoming weights and inputs, so after the ReLU the score is set by γ_i and β_i and stays near 1
unless β_i ≲ −2|γ_i|: a channel that is silent at test time (its running statistics put every input
below zero) is never found. Without BatchNorm or dropout both modes give the same scores.
"""
from __future__ import annotations

import torch

from plasticity import PlasticityMethod, register_plasticity


def redo_scores(mean_abs: torch.Tensor) -> torch.Tensor:
    """s_i = mean|h_i| / layer mean; all zeros (every unit dormant) when the whole layer is silent."""
    layer_mean = mean_abs.mean()
    return torch.where(layer_mean > 0, mean_abs / layer_mean.clamp(min=torch.finfo(mean_abs.dtype).tiny), 0.0)


@register_plasticity("redo")
class ReDO(PlasticityMethod):
    NEEDS_UNITS = True
    BOUNDS = {"redo_tau": "[0, inf)", "redo_every": "[1, inf)", "redo_prob": "(0, 1]"}  # --redo_prob: a probability

    @staticmethod
    def add_args(parser):
        parser.add_argument("--redo_tau", type=float, default=0.025,
                            help="dormancy threshold τ on the mean-normalised score (paper: 0.025, 0.1; 0 = dead)")
        parser.add_argument("--redo_every", type=int, default=1000,
                            help="reset dormant units every F optimizer steps of the run (a run shorter than F "
                                 "steps never checks; the redo_checks metric counts the checks of each task)")
        parser.add_argument("--redo_prob", type=float, default=None,
                            help="instead of --redo_every: check at each step with this probability")

    def __init__(self, net, optimizer, units, args):
        super().__init__(net, optimizer, units, args)
        units.monitor.keep_step_inputs(net)  # the check re-reads the step's inputs in eval mode
        self.checks = 0  # dormancy checks since the last task_metrics

    def after_step(self, batch):
        step = batch.step
        if self.args.redo_prob is not None:
            due = float(torch.rand(())) < self.args.redo_prob
        else:
            due = (step + 1) % self.args.redo_every == 0
        if not due:
            return
        self.checks += 1
        for i, mean_abs in enumerate(self.units.eval_mean_abs()):
            self.units.reset(i, redo_scores(mean_abs) <= self.args.redo_tau)

    def task_metrics(self, task):
        checks, self.checks = self.checks, 0
        return {"redo_checks": float(checks)}
