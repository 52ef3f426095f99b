"""cnn: a small convolutional network for small images (8×8 digits, 28×28 MNIST, 32×32 CIFAR).

The classic small conv net of LeNet-5 (LeCun et al. 1998, "Gradient-based learning applied to document
recognition") and of the continual-learning plasticity studies (Dohare et al. 2024, "Loss of plasticity
in deep continual learning", Nature: convolution + max-pool layers, then fully connected layers): a few
conv3×3 → ReLU → max-pool blocks, one fully connected hidden layer, and a linear head.
"""
from __future__ import annotations

import torch
from torch import nn

from backbones import Backbone, UnitGroup, register_backbone
from utils.errors import ConfigError
from utils.registry import check_bounds


def widths(text: str) -> list[int]:
    """--cnn_channels as a list of ints (an entry that is no integer raises ValueError)."""
    return [int(w) for w in str(text).split(",") if w.strip()]


@register_backbone("cnn")
class CNN(Backbone):
    """[conv3×3 (padding 1) → ReLU → max-pool 2] per --cnn_channels → dense → ReLU → Linear head.

    Each block halves the map while it is at least 2×2 (8×8 → 4×4 → 2×2 with the default two blocks;
    28 → 14 → 7; 32 → 16 → 8); a map already 1 pixel wide or high is not pooled further, so any image
    size works. The hidden layer ("dense", --cnn_hidden units) is fully connected to the last block's
    flattened maps. It is held as a convolution whose kernel covers the whole map: the same function,
    parameter count and PyTorch initialisation as nn.Linear(C·H·W, hidden) on the flattened maps, with
    a weight [hidden, C, H, W] whose axis 1 is the last block's channels, so those channels' outgoing
    weights are one slice each. Every layer keeps PyTorch's initialisation.

    Hidden units: every block's channels (seen after its ReLU, before the pool) and the dense units.
    """

    BOUNDS = {"cnn_hidden": "[1, inf)"}  # --cnn_channels, a list, is checked in check_args

    @staticmethod
    def add_args(parser):
        parser.add_argument("--cnn_channels", type=str, default="32,64",
                            help="comma-separated channel counts of the cnn's conv blocks (one block each)")
        parser.add_argument("--cnn_hidden", type=int, default=128,
                            help="units of the cnn's fully connected hidden layer")

    @staticmethod
    def check_args(args):
        try:
            channels = widths(args.cnn_channels)
        except ValueError:
            channels = [0]
        if not channels or min(channels) <= 0:
            raise ConfigError(f"--cnn_channels {args.cnn_channels!r} is not a list of positive channel counts; "
                              f"give one positive integer per conv block, such as --cnn_channels 32,64.")

    def __init__(self, args, input_shape: tuple[int, ...], n_classes: int):
        super().__init__()
        check_bounds(args, self.BOUNDS, f"the backbone {self.NAME}")  # built directly, not through main.py
        self.check_args(args)
        in_channels, height, width = input_shape
        channels = widths(args.cnn_channels)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip([in_channels] + channels, channels))
        # One ReLU module per block, so each block's activations can be observed on its own.
        self.acts = nn.ModuleList(nn.ReLU() for _ in channels)
        pools = []
        for _ in channels:
            pool = height >= 2 and width >= 2
            pools.append(nn.MaxPool2d(2) if pool else nn.Identity())
            height, width = (height // 2, width // 2) if pool else (height, width)
        self.pools = nn.ModuleList(pools)
        self.dense = nn.Conv2d(channels[-1], args.cnn_hidden, (height, width))  # fully connected, see above
        self.dense_act = nn.ReLU()
        self.head = nn.Linear(args.cnn_hidden, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for conv, act, pool in zip(self.convs, self.acts, self.pools):
            x = pool(act(conv(x)))
        return self.dense_act(self.dense(x)).flatten(1)

    def hidden_units(self) -> list[UnitGroup]:
        readers = list(self.convs[1:]) + [self.dense]
        groups = [
            UnitGroup(
                name=f"convs.{i}",
                n_units=conv.out_channels,
                incoming=[(conv.weight, 0), (conv.bias, 0)],
                outgoing=[(reader.weight, 1)],
                activation=act,
            )
            for i, (conv, act, reader) in enumerate(zip(self.convs, self.acts, readers))
        ]
        return groups + [UnitGroup(
            name="dense",
            n_units=self.dense.out_channels,
            incoming=[(self.dense.weight, 0), (self.dense.bias, 0)],
            outgoing=[(self.head.weight, 1)],
            activation=self.dense_act,
        )]
