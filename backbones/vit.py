"""vit: a small pre-LN Vision Transformer (timm) as in the continual-ImageNet plasticity experiments."""
from __future__ import annotations

import torch
from torch import nn

from backbones import Backbone, UnitGroup, register_backbone
from utils.errors import ConfigError


@register_backbone("vit")
class ViT(Backbone):
    """timm VisionTransformer with a class token; its MLP hidden units are the hidden units."""

    @staticmethod
    def add_args(parser):
        parser.add_argument("--vit_depth", type=int, default=3, help="number of transformer blocks")
        parser.add_argument("--vit_width", type=int, default=48,
                            help="embedding width (the ViT study uses 16·depth)")
        parser.add_argument("--vit_heads", type=int, default=3, help="attention heads")
        parser.add_argument("--vit_patch", type=int, default=4, help="patch size in pixels")
        parser.add_argument("--vit_mlp_ratio", type=float, default=4.0,
                            help="MLP hidden width as a multiple of the embedding width")
        parser.add_argument("--vit_act", choices=["relu", "gelu"], default="relu",
                            help="activation of the MLP hidden units")

    def __init__(self, args, input_shape: tuple[int, ...], n_classes: int):
        super().__init__()
        in_chans, height, width = input_shape
        if height % args.vit_patch or width % args.vit_patch:
            raise ConfigError(f"--vit_patch {args.vit_patch} does not divide the image size "
                              f"{height}×{width}; choose a patch size that divides it.")
        if args.vit_width % args.vit_heads:
            raise ConfigError(f"--vit_width {args.vit_width} is not divisible by --vit_heads "
                              f"{args.vit_heads}; choose a width that is a multiple of the heads.")
        from timm.models.vision_transformer import VisionTransformer  # here: importing timm takes seconds

        self.net = VisionTransformer(
            img_size=(height, width), patch_size=args.vit_patch, in_chans=in_chans,
            num_classes=n_classes, global_pool="token", class_token=True,
            embed_dim=args.vit_width, depth=args.vit_depth, num_heads=args.vit_heads,
            mlp_ratio=args.vit_mlp_ratio, act_layer={"relu": nn.ReLU, "gelu": nn.GELU}[args.vit_act],
        )
        # The head moves to the backbone (parameters and state-dict keys stay unique), so the
        # timm network itself returns the class token's pre-logit features.
        self.head = self.net.head
        self.net.head = nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.net.blocks]

    def init_module_(self, module: nn.Module) -> bool:
        """timm's ViT initialisation: linear weights truncated normal (std 0.02) with zero biases,
        position embedding truncated normal (std 0.02), class token normal (std 1e-6); the
        patch-embedding convolution and the norms keep PyTorch's initialisation."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            return True
        if module is self.net:  # the tokens the timm network holds itself
            nn.init.trunc_normal_(self.net.pos_embed, std=0.02)
            nn.init.normal_(self.net.cls_token, std=1e-6)
            return True
        return False

    def hidden_units(self) -> list[UnitGroup]:
        return [
            UnitGroup(
                name=f"blocks.{i}.mlp",
                n_units=block.mlp.fc1.out_features,
                incoming=[(block.mlp.fc1.weight, 0), (block.mlp.fc1.bias, 0)],
                outgoing=[(block.mlp.fc2.weight, 1)],
                activation=block.mlp.act,
                activation_axis=-1,
            )
            for i, block in enumerate(self.net.blocks)
        ]
