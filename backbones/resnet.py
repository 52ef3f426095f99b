"""resnet18, reduced_resnet18: the CIFAR ResNet-18 of Mammoth/DER (nf 64) and GEM's reduced one (nf 20)."""
from __future__ import annotations

import torch
from torch import nn

from backbones import Backbone, UnitGroup, register_backbone


class BasicBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # A module of its own (not F.relu) so plasticity methods can hook the inner units.
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


@register_backbone("resnet18")
class ResNet18(Backbone):
    """3×3 stem (stride 1, no max-pool) → BasicBlocks [2,2,2,2] of widths nf·(1,2,4,8) → mean pool → Linear.

    Only the inner channels of each block (conv1's outputs) are hidden units. The stem's and the
    blocks' output channels form the residual stream: each is read by the next block's conv1 and,
    through the identity shortcuts, added into every later block's output, so zeroing a channel's
    "outgoing" convolution weights would not remove it from the function and a reset there would
    change the network's output.
    """

    @staticmethod
    def add_args(parser):
        parser.add_argument("--resnet_width", type=int, default=64,
                            help="base width nf of resnet18 (stage widths nf, 2nf, 4nf, 8nf)")

    @staticmethod
    def width(args) -> int:
        """Base width nf."""
        return args.resnet_width

    def __init__(self, args, input_shape: tuple[int, ...], n_classes: int):
        super().__init__()
        nf = self.width(args)
        self.conv1 = nn.Conv2d(input_shape[0], nf, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        self.act1 = nn.ReLU()
        blocks, in_planes = [], nf
        for stage, mult in enumerate((1, 2, 4, 8)):
            for i in range(2):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, nf * mult, stride))
                in_planes = nf * mult
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(in_planes, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        for block in self.blocks:
            x = block(x)
        # Global average pool, so any input size (28, 32, 64) gives an 8·nf vector.
        return x.mean(dim=(2, 3))

    def hidden_units(self) -> list[UnitGroup]:
        return [
            UnitGroup(
                name=f"blocks.{i}",
                n_units=block.conv1.out_channels,
                incoming=[(block.conv1.weight, 0), (block.bn1.weight, 0), (block.bn1.bias, 0)],
                outgoing=[(block.conv2.weight, 1)],
                activation=block.act1,
            )
            for i, block in enumerate(self.blocks)
        ]


@register_backbone("reduced_resnet18")
class ReducedResNet18(ResNet18):
    """The reduced ResNet-18 of GEM and Mammoth: resnet18 with nf fixed at 20."""

    @staticmethod
    def add_args(parser):
        """No flags: the width is fixed (use resnet18 --resnet_width for other widths)."""

    @staticmethod
    def width(args) -> int:
        """Base width nf = 20."""
        return 20
