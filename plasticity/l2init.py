"""l2init: loss + λ‖θ − θ₀‖², θ₀ the parameters at initialisation (Kumar et al. 2023, "Maintaining plasticity
in continual learning via regenerative regularization")."""
from __future__ import annotations

from plasticity import register_plasticity
from plasticity._regularizer import L2Penalty


@register_plasticity("l2init")
class L2Init(L2Penalty):
    LAMBDA_FLAG = "l2init_lambda"
    BOUNDS = {"l2init_lambda": "[0, inf)"}

    @staticmethod
    def add_args(parser):
        parser.add_argument("--l2init_lambda", type=float, default=1e-2,
                            help="λ of loss + λ‖θ − θ₀‖² (Continual-ImageNet ViT comparison, all settings: 1e-2)")

    def __init__(self, net, optimizer, units, args):
        super().__init__(net, optimizer, units, args)
        self.reference = [p.detach().clone() for p in self.params]
