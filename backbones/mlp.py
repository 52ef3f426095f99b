"""mlp: the fully connected network of the MNIST-style continual-learning benchmarks."""
from __future__ import annotations

import math

import torch
from torch import nn

from backbones import Backbone, UnitGroup, register_backbone

INITS = ("xavier", "torch")
# The datasets on which Mammoth builds this network as its MNISTMLP, whose reset_parameters applies
# Xavier-uniform weights and zero biases to every linear layer, the classifier included.
MAMMOTH_DATASETS = ("seq-mnist", "perm-mnist", "rot-mnist")


def default_init(dataset: str | None) -> str:
    """--mlp_init when none is given: Mammoth's on Mammoth's datasets, PyTorch's elsewhere."""
    return "xavier" if dataset in MAMMOTH_DATASETS else "torch"


class CReLU(nn.Module):
    """Concatenated ReLU (Shang et al. 2016): [B, n] → [B, 2n] = concat(relu(h), relu(−h)), so every unit passes
    either its positive or its negative part on and none can die (Abbas et al. 2023)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((torch.relu(x), torch.relu(-x)), dim=1)


ACTIVATIONS = {"relu": nn.ReLU, "crelu": CReLU}
OUTPUTS_PER_UNIT = {"relu": 1, "crelu": 2}


@register_backbone("mlp")
class MLP(Backbone):
    """Input flattened → [Linear → (LayerNorm) → ReLU] × len(hidden sizes) → Linear head (Mammoth's 100-100 by
    default; --mlp_norm layernorm adds the LayerNorm, Plasticine's LayerNorm-in-the-backbone variant;
    --mlp_activation crelu puts CReLU in the ReLU's place, which doubles the inputs of the layer after it)."""

    @staticmethod
    def add_args(parser):
        parser.add_argument("--mlp_hidden", type=str, default="100,100",
                            help="comma-separated hidden layer widths of the mlp backbone")
        parser.add_argument("--mlp_init", choices=INITS, default=None,
                            help="initialisation of every linear layer of the mlp, head included: xavier "
                                 "(Xavier-uniform weights, bound sqrt(6/(fan_in+fan_out)), zero biases: "
                                 "Mammoth's MNISTMLP) or torch (PyTorch's nn.Linear default, weights and "
                                 "biases uniform within 1/sqrt(fan_in)); default: xavier on Mammoth's "
                                 f"datasets ({', '.join(MAMMOTH_DATASETS)}), torch on the others")
        parser.add_argument("--mlp_norm", choices=("none", "layernorm"), default="none",
                            help="layernorm: a LayerNorm (learned scale and shift per unit) between each hidden "
                                 "layer and its ReLU, which keeps pre-activations normalised as plasticity "
                                 "studies (Plasticine, Lyle et al. 2024) use it")
        parser.add_argument("--mlp_activation", choices=tuple(ACTIVATIONS), default="relu",
                            help="crelu: concatenated ReLU, each hidden layer of n units outputs concat(relu(h), "
                                 "relu(-h)), 2n features; the --mlp_hidden widths stay the layers' unit counts, so "
                                 "the next layer (or the head) reads twice as many inputs, as in Plasticine (halve "
                                 "--mlp_hidden for about the parameter count of the relu network, as Abbas et al. "
                                 "2023)")

    @staticmethod
    def check_args(args):
        if getattr(args, "mlp_init", None) is None:
            args.mlp_init = default_init(getattr(args, "dataset", None))

    def __init__(self, args, input_shape: tuple[int, ...], n_classes: int):
        super().__init__()
        self.init = getattr(args, "mlp_init", None) or default_init(getattr(args, "dataset", None))
        activation = getattr(args, "mlp_activation", "relu")
        self.outputs_per_unit = OUTPUTS_PER_UNIT[activation]
        units = [int(w) for w in str(args.mlp_hidden).split(",") if w]
        inputs = [math.prod(input_shape)] + [self.outputs_per_unit * w for w in units]  # what each layer reads
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(inputs[:-1], units))
        # One activation module per layer, so each layer's activations can be observed on its own.
        self.activations = nn.ModuleList(ACTIVATIONS[activation]() for _ in self.layers)
        self.norms = nn.ModuleList(nn.LayerNorm(w) for w in units) if getattr(args, "mlp_norm", "none") == \
            "layernorm" else None
        self.head = nn.Linear(inputs[-1], n_classes)
        if self.init == "xavier":
            # As Mammoth: the layers are built (drawing PyTorch's initialisation), then redrawn in
            # order, so one seed gives Mammoth's initial weights exactly.
            self.reinitialize_()

    def init_module_(self, module: nn.Module) -> bool:
        """--mlp_init xavier: Xavier-uniform weights and zero biases for every linear layer, head included
        (Mammoth's rule); any other module, and every one under --mlp_init torch, keeps PyTorch's."""
        if self.init != "xavier" or not isinstance(module, nn.Linear):
            return False
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
        return True

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i, (layer, act) in enumerate(zip(self.layers, self.activations)):
            x = layer(x)
            x = act(x if self.norms is None else self.norms[i](x))
        return x

    def hidden_units(self) -> list[UnitGroup]:
        readers = list(self.layers[1:]) + [self.head]
        return [
            UnitGroup(
                name=f"layers.{i}",
                n_units=layer.out_features,
                incoming=[(layer.weight, 0), (layer.bias, 0),
                          *([] if self.norms is None else [(self.norms[i].weight, 0), (self.norms[i].bias, 0)])],
                outgoing=[(reader.weight, 1)],  # with CReLU, columns i and i + n read unit i
                activation=act,
                activation_copies=self.outputs_per_unit,
            )
            for i, (layer, act, reader) in enumerate(zip(self.layers, self.activations, readers))
        ]
