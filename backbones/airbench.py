"""airbench: the small fast CNN of airbench94 (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU")."""
from __future__ import annotations

import torch
from torch import nn

from backbones import Backbone, UnitGroup, register_backbone
from utils.errors import ConfigError

STEM_WIDTH = 24  # the paper's whitening width: 2 · 3 channels · 2×2 patch (each filter and its negative)
WIDTHS = (64, 256, 256)
IMAGE_SIZE = 32
OUTPUT_SCALE = 1 / 9


class BatchNorm(nn.BatchNorm2d):
    """The paper's BatchNorm: scale fixed at 1, learned shift, running statistics 0.6·old + 0.4·batch.

    The paper states its momentum as the weight of the old running statistics (0.6), which is
    PyTorch's momentum 0.4, and uses eps 1e-12. The scale is a buffer of ones rather than a frozen
    parameter, so no optimizer, weight decay, L2 penalty or Shrink & Perturb step can move it.
    """

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=0.4)
        del self.weight
        self.register_buffer("weight", torch.ones(channels))


class ConvGroup(nn.Module):
    """conv3×3 → max-pool 2 → BN → GELU → conv3×3 → BN → GELU (bias-free convolutions, padding 1)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = BatchNorm(channels)
        # Modules of their own (not F.gelu) so plasticity methods can hook the inner units.
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = BatchNorm(channels)
        self.act2 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.pool(self.conv1(x))))
        return self.act2(self.bn2(self.conv2(x)))


@register_backbone("airbench")
class Airbench(Backbone):
    """2×2 stem (24 channels) → GELU → ConvGroups of widths (64, 256, 256)·width → max-pool 3 → Linear/9.

    On a 32×32 image the unpadded 2×2 stem leaves 31×31, the groups' pools 15, 7 and 3, and the
    final 3×3 max-pool a single position, so the head reads one vector of the last group's width;
    other sizes are refused. The paper initialises the stem by whitening the training images' 2×2
    patches and freezes its weights; a backbone is built without the data, so here the stem is an
    ordinary learned convolution with bias in PyTorch's initialisation (as are the other layers:
    the paper's partial identity initialisation of the 3×3 convolutions is not used). The head has
    no bias, and the logits are scaled by 1/9 as in the paper.

    Only the inner channels of each group (conv1's outputs, seen after bn1's GELU) are hidden units,
    as for resnet18's blocks; bn1's scale is fixed at 1, so the incoming entries are conv1's
    filters and bn1's shift, and the outgoing ones conv2's input channels.
    """

    BOUNDS = {"airbench_width": "(0, inf)"}

    @staticmethod
    def add_args(parser):
        parser.add_argument("--airbench_width", type=float, default=1.0,
                            help="multiplier of the airbench group widths 64, 256, 256 (rounded)")

    def __init__(self, args, input_shape: tuple[int, ...], n_classes: int):
        super().__init__()
        in_channels, height, width = input_shape
        if (height, width) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ConfigError(f"the airbench backbone takes 32×32 images, not {height}×{width}; use a "
                              f"32×32 dataset or another backbone (resnet18 or vit).")
        widths = [max(1, round(w * args.airbench_width)) for w in WIDTHS]
        self.stem = nn.Conv2d(in_channels, STEM_WIDTH, 2, padding=0, bias=True)
        self.stem_act = nn.GELU()
        self.groups = nn.ModuleList(ConvGroup(a, b) for a, b in zip([STEM_WIDTH] + widths[:-1], widths))
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(widths[-1], n_classes, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self.stem(x))
        for group in self.groups:
            x = group(x)
        # The paper scales the logits by 1/9; the head has no bias, so scaling its input is the same
        # and keeps head(features(x)) equal to the network's output.
        return self.pool(x).flatten(1) * OUTPUT_SCALE

    def hidden_units(self) -> list[UnitGroup]:
        return [
            UnitGroup(
                name=f"groups.{i}",
                n_units=group.conv1.out_channels,
                incoming=[(group.conv1.weight, 0), (group.bn1.bias, 0)],
                outgoing=[(group.conv2.weight, 1)],
                activation=group.act1,
            )
            for i, group in enumerate(self.groups)
        ]
