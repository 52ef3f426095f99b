"""The columns of a progressive neural network (Rusu et al. 2016) built from the mlp backbone.

Column k is an `MLP` of its own (the network --backbone mlp builds, with its initialisation); for k > 0 each
of its hidden layers after the first, and its head, also receives a lateral adapter's output computed from
the activations of the layer below in every earlier column:

    h_i^(k) = ReLU(W_i^(k) h_{i-1}^(k) + U_i^(k) ReLU(V_i^(k) (α_i^(k) ⊙ [h_{i-1}^(1), ..., h_{i-1}^(k-1)]) + c_i^(k)))

(the head the same without the ReLU outside). The earlier columns' activations are their whole forward
passes, laterals included, as in the paper. Mammoth's backbone/MNISTMLP_PNN.py has the same adapter
(`AlphaModule` then Linear, ReLU, Linear without bias) with α a vector over the concatenated units, drawn
uniformly in [0, 0.1); this module keeps that shape and draw.
"""
from __future__ import annotations

import torch
from torch import nn

from backbones.mlp import MLP

ALPHA_INIT = 0.1  # α ~ U[0, ALPHA_INIT) per unit, as Mammoth's AlphaModule


class LateralAdapter(nn.Module):
    """α ⊙ h  →  V (Linear)  →  ReLU  →  U (Linear without bias): earlier columns' units into one layer."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.project = nn.Linear(in_features, hidden)  # V and its bias c
        self.out = nn.Linear(hidden, out_features, bias=False)  # U
        self.alpha = nn.Parameter(torch.rand(1, in_features) * ALPHA_INIT)

    def forward(self, earlier: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.project(earlier * self.alpha)))


class ProgressiveMLP(nn.Module):
    """Columns of the mlp, one per task; `forward(x, column)` runs the columns up to `column` (the newest by
    default) and returns that column's logits over all classes."""

    def __init__(self, first: MLP):
        super().__init__()
        self.columns = nn.ModuleList([first])
        # adapters[k][i]: into layer i + 1 of column k (the head for the last i); none for column 0
        self.adapters = nn.ModuleList([nn.ModuleList()])

    def add_column(self, column: MLP) -> None:
        """Append a column (a freshly built mlp of the same shape) with its adapters from all earlier ones."""
        k = len(self.columns)
        widths = [layer.out_features for layer in column.layers]
        targets = widths[1:] + [column.head.out_features]
        self.columns.append(column)
        self.adapters.append(nn.ModuleList(LateralAdapter(k * width, width, target)
                                           for width, target in zip(widths, targets)))

    def forward(self, x: torch.Tensor, column: int | None = None) -> torch.Tensor:
        last = len(self.columns) - 1 if column is None else column
        x = x.flatten(1)
        below: list[list[torch.Tensor]] = []  # per column so far: its hidden activations, layer by layer
        for k in range(last + 1):
            net, adapters = self.columns[k], self.adapters[k]
            h, hidden = x, []
            for i, (layer, act) in enumerate(zip(net.layers, net.activations)):
                pre = layer(h)
                if k > 0 and i > 0:
                    pre = pre + adapters[i - 1](torch.cat([earlier[i - 1] for earlier in below], 1))
                h = act(pre)
                hidden.append(h)
            below.append(hidden)
        out = self.columns[last].head(h)
        if last > 0:
            out = out + self.adapters[last][-1](torch.cat([earlier[-1] for earlier in below[:-1]], 1))
        return out
