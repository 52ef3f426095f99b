"""l2init: loss + λ‖θ − θ₀‖², θ₀ the parameters at initialisation (Kumar et al. 2023, "Maintaining plasticity
in continual learning via regenerative regularization")."""
from __future__ import annotations

from plasticity import PlasticityMethod, register_plasticity
from plasticity._regularizer import add_l2_gradient
from utils.errors import ConfigError


@register_plasticity("l2init")
class L2Init(PlasticityMethod):
    STATE = ("initial",)

    @staticmethod
    def add_args(parser):
        parser.add_argument("--l2init_lambda", type=float, default=1e-2,
                            help="λ of loss + λ‖θ − θ₀‖² (seed ViT comparison, all settings: 1e-2)")

    @staticmethod
    def check_args(args):
        if args.l2init_lambda < 0:
            raise ConfigError(f"--l2init_lambda cannot be negative, got {args.l2init_lambda}")

    def __init__(self, net, optimizer, units, args):
        super().__init__(net, optimizer, units, args)
        self.params = list(net.parameters())
        self.initial = [p.detach().clone() for p in self.params]

    def before_step(self):
        add_l2_gradient(self.params, self.args.l2init_lambda, self.initial)
