"""shrink_perturb: θ ← p·θ + σ·ε after every optimizer step (Ash & Adams 2020).

Two continual variants: ε a fresh sample of the network's initialisation (`--sp_noise init`, the
CL-transformers setting p 0.99, σ 0.01, the default) or ε ~ N(0, 1) (`--sp_noise gaussian`; Dohare
et al.'s CNN setting is weight decay 1e-5 with noise std 1e-5, i.e. `--sp_shrink` 1 − lr·1e-5).
"""
from __future__ import annotations

import torch

from plasticity import PlasticityMethod, register_plasticity
from plasticity._hidden_units import Reinitializer


@register_plasticity("shrink_perturb")
class ShrinkPerturb(PlasticityMethod):
    # the scratch network fresh draws come from holds no state: every use re-draws it from the RNG
    REFERENCES = (*PlasticityMethod.REFERENCES, "reinitializer")
    BOUNDS = {"sp_shrink": "(0, 1]", "sp_sigma": "[0, inf)"}  # p a shrink factor, σ a scale

    @staticmethod
    def add_args(parser):
        parser.add_argument("--sp_shrink", type=float, default=0.99, help="shrink factor p in θ ← p·θ + σ·ε")
        parser.add_argument("--sp_sigma", type=float, default=0.01, help="perturbation scale σ")
        parser.add_argument("--sp_noise", choices=("init", "gaussian"), default="init",
                            help="ε: a fresh draw of the initialisation, or standard Gaussian noise")

    def __init__(self, net, optimizer, units, args):
        super().__init__(net, optimizer, units, args)
        self.names, self.params = zip(*net.named_parameters())
        self.reinitializer = Reinitializer(net) if args.sp_noise == "init" else None

    @torch.no_grad()
    def after_step(self, batch):
        params = list(self.params)
        torch._foreach_mul_(params, self.args.sp_shrink)
        if self.args.sp_sigma == 0:
            return
        if self.reinitializer is not None:
            fresh = self.reinitializer.fresh_network()
            noise = [fresh[name] for name in self.names]
        else:
            noise = [torch.randn_like(p) for p in params]
        torch._foreach_add_(params, noise, alpha=self.args.sp_sigma)
