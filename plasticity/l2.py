"""l2: loss + λ‖θ‖² over all parameters, or over the attention Q, K, V weights only (L2*, `--l2_params qkv`)."""
from __future__ import annotations

from plasticity import register_plasticity
from plasticity._regularizer import L2Penalty
from utils.errors import ConfigError


@register_plasticity("l2")
class L2(L2Penalty):
    LAMBDA_FLAG = "l2_lambda"
    BOUNDS = {"l2_lambda": "[0, inf)"}

    @staticmethod
    def add_args(parser):
        parser.add_argument("--l2_lambda", type=float, default=1e-3,
                            help="λ of loss + λ‖θ‖² (Continual-ImageNet ViT comparison, L3 lr 1e-3: 1e-3)")
        parser.add_argument("--l2_params", choices=("all", "qkv"), default="all",
                            help="all parameters, or only the attention Q, K, V weights (L2*)")

    def __init__(self, net, optimizer, units, args):
        super().__init__(net, optimizer, units, args)
        if args.l2_params == "qkv":
            self.params = [p for name, p in net.named_parameters() if name.endswith("attn.qkv.weight")]
            if not self.params:
                raise ConfigError(f"--l2_params qkv regularizes attention Q, K, V weights, which the {args.backbone} "
                                  f"backbone does not have; use --l2_params all or a vit backbone")
