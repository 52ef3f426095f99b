"""mlp: the fully connected network of the MNIST-style continual-learning benchmarks."""
from __future__ import annotations

import math

import torch
from torch import nn

from backbones import Backbone, UnitGroup, register_backbone


@register_backbone("mlp")
class MLP(Backbone):
    """Input flattened → [Linear → ReLU] × len(hidden sizes) → Linear head (Mammoth's 100-100 by default)."""

    @staticmethod
    def add_args(parser):
        parser.add_argument("--mlp_hidden", type=str, default="100,100",
                            help="comma-separated hidden layer widths of the mlp backbone")

    def __init__(self, args, input_shape: tuple[int, ...], n_classes: int):
        super().__init__()
        widths = [math.prod(input_shape)] + [int(w) for w in str(args.mlp_hidden).split(",") if w]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        # One ReLU module per layer, so each layer's activations can be observed on its own.
        self.activations = nn.ModuleList(nn.ReLU() for _ in self.layers)
        self.head = nn.Linear(widths[-1], n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer, act in zip(self.layers, self.activations):
            x = act(layer(x))
        return x

    def hidden_units(self) -> list[UnitGroup]:
        readers = list(self.layers[1:]) + [self.head]
        return [
            UnitGroup(
                name=f"layers.{i}",
                n_units=layer.out_features,
                incoming=[(layer.weight, 0), (layer.bias, 0)],
                outgoing=[(reader.weight, 1)],
                activation=act,
            )
            for i, (layer, act, reader) in enumerate(zip(self.layers, self.activations, readers))
        ]
