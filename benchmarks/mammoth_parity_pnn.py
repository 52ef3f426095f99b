"""Mammoth's PNN MLP and this repository's, from the same weights: outputs and SGD steps on two columns.

Run with Mammoth's interpreter from this repository's root:

    /work/mammoth-venv/bin/python benchmarks/mammoth_parity_pnn.py [--mammoth /work/mammoth]

Mammoth's side is its backbone/MNISTMLP_PNN.py (commit e75a491) trained as its models/pnn.py trains a
column: SGD over the column's parameters at lr 0.1, zero_grad, cross-entropy of the column's logits over
all 10 classes, backward, step (its `observe`); a new column and a new optimizer after the first task
(its `end_task`). The scenario is tests/test_mammoth_parity.py's (benchmarks/mammoth_parity_lockstep.py:
integer-formula 28x28 images, batch 4, 3 steps of task 0 on classes 0/1, 2 steps of task 1 on 2/3),
the first column's weights `scenario_weights()`, the second column's and its adapters' `column_two_weights()`.

Stock Mammoth never takes its lateral branch (`self.old_cols` stays []), so its second column is an
independent MLP; the script checks that, then switches the branch on (`old_cols = [first column]`) and
compares that against ours, whose second column always uses its laterals. It prints the differences and
the numbers tests/test_method_pnn.py pins.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.mammoth_parity_lockstep import import_from_mammoth, scenario_batches, scenario_weights  # noqa: E402

LR = 0.1
# Our parameter names → Mammoth's, for the second column and its adapters (adaptor = [AlphaModule, base]).
COLUMN_TWO = {"columns.1.layers.0": "fc1", "columns.1.layers.1": "fc2", "columns.1.head": "classifier",
              "adapters.1.0.project": "adaptor1.1.0", "adapters.1.0.out": "adaptor1.1.2",
              "adapters.1.1.project": "adaptor2.1.0", "adapters.1.1.out": "adaptor2.1.2"}
ALPHAS = {"adapters.1.0.alpha": "adaptor1.0.alpha", "adapters.1.1.alpha": "adaptor2.0.alpha"}


def formula(shape: tuple[int, ...], seed: int, bound: float) -> torch.Tensor:
    """A fixed tensor of `shape` with entries in [-bound, bound], from integer arithmetic only."""
    grid = (np.arange(int(np.prod(shape))).reshape(shape) * 7919 + seed * 15485863) % 2001  # 0..2000
    return torch.from_numpy((grid - 1000) / 1000 * bound).float()


def column_two_weights() -> dict[str, torch.Tensor]:
    """The second column's and its adapters' weights (our names): Xavier-bounded layers, biases nonzero."""
    shapes = {"columns.1.layers.0": (100, 784), "columns.1.layers.1": (100, 100), "columns.1.head": (10, 100),
              "adapters.1.0.project": (100, 100), "adapters.1.0.out": (100, 100),
              "adapters.1.1.project": (100, 100), "adapters.1.1.out": (10, 100)}
    weights = {}
    for k, (name, (fan_out, fan_in)) in enumerate(shapes.items()):
        weights[f"{name}.weight"] = formula((fan_out, fan_in), 3 + k, (6.0 / (fan_in + fan_out)) ** 0.5)
        if not name.endswith(".out"):  # U has no bias
            weights[f"{name}.bias"] = formula((fan_out,), 20 + k, 0.05)
    for k, name in enumerate(ALPHAS):
        weights[name] = (formula((1, 100), 40 + k, 0.05) + 0.05).clamp(0, 0.0999)  # in [0, 0.1), as drawn
    return weights


def mammoth_name(ours: str) -> str:
    if ours in ALPHAS:
        return ALPHAS[ours]
    module, _, leaf = ours.rpartition(".")
    return f"{COLUMN_TWO[module]}.{leaf}"


def inputs(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, 28, 28] → float [B, 1, 28, 28] in [0, 1], as ToTensor gives Mammoth and our seq-mnist gives us."""
    return torch.from_numpy(images).float()[:, None] / 255.0


def checksums(tensor: torch.Tensor) -> list[float]:
    return [tensor.double().sum().item(), tensor.double().square().sum().item(), tensor.flatten()[0].item()]


def import_mammoth(root: Path):
    return import_from_mammoth(root, {"net": "backbone.MNISTMLP_PNN:MNISTMLP_PNN"}).net


def train_column(net, forward, batches) -> list[float]:
    """Mammoth's pnn `observe` per batch, with a new SGD over the column's trainable parameters."""
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _, images, labels in batches:
        opt.zero_grad()
        loss = F.cross_entropy(forward(inputs(images)), torch.from_numpy(labels))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def mammoth_run(MNISTMLP_PNN) -> dict:
    batches = scenario_batches()
    probe = inputs(np.stack([b[1] for b in batches]).reshape(-1, 28, 28)[:8])
    first = MNISTMLP_PNN(784, 10)
    with torch.no_grad():
        for ours, theirs in (("layers.0", "fc1"), ("layers.1", "fc2"), ("head", "classifier")):
            for leaf in ("weight", "bias"):
                first.get_parameter(f"{theirs}.{leaf}").copy_(scenario_weights()[f"{ours}.{leaf}"])
    out = {"first_logits": first(probe).detach()}
    out["first_losses"] = train_column(first, first, [b for b in batches if b[0] == 0])
    first_after = {k: v.clone() for k, v in first.state_dict().items()}
    second = MNISTMLP_PNN(784, 10, [first])
    with torch.no_grad():
        for name, value in column_two_weights().items():
            second.get_parameter(mammoth_name(name)).copy_(value)
    # Stock: the lateral branch is never taken; the column is its own fc1, fc2 and classifier.
    alone = second.classifier(F.relu(second.fc2(F.relu(second.fc1(probe.flatten(1))))))
    out["stock_gap"] = (second(probe) - alone).abs().max().item()
    second.old_cols = [first]  # the lateral branch, switched on
    out["second_logits"] = second(probe).detach()
    out["second_losses"] = train_column(second, second, [b for b in batches if b[0] == 1])
    out["second_after"] = {n: second.get_parameter(mammoth_name(n)).detach().clone() for n in column_two_weights()}
    out["first_unchanged"] = all(torch.equal(first_after[k], v) for k, v in first.state_dict().items())
    return out


def ours_run() -> dict:
    from backbones._pnn_mlp import ProgressiveMLP
    from backbones.mlp import MLP

    args = SimpleNamespace(mlp_hidden="100,100", mlp_init="xavier", mlp_norm="none", dataset="seq-mnist")
    batches = scenario_batches()
    probe = inputs(np.stack([b[1] for b in batches]).reshape(-1, 28, 28)[:8])
    net = ProgressiveMLP(MLP(args, (1, 28, 28), 10))
    with torch.no_grad():
        for name, value in scenario_weights().items():
            net.get_parameter(f"columns.0.{name}").copy_(value)
    out = {"first_logits": net(probe, 0).detach()}
    out["first_losses"] = train_column(net, net, [b for b in batches if b[0] == 0])
    for p in net.parameters():
        p.requires_grad_(False)
    net.add_column(MLP(args, (1, 28, 28), 10))
    with torch.no_grad():
        for name, value in column_two_weights().items():
            net.get_parameter(name).copy_(value)
    out["second_logits"] = net(probe, 1).detach()
    out["second_losses"] = train_column(net, net, [b for b in batches if b[0] == 1])
    out["second_after"] = {n: net.get_parameter(n).detach().clone() for n in column_two_weights()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mammoth", default="/work/mammoth", help="Mammoth's work tree")
    mammoth = mammoth_run(import_mammoth(Path(parser.parse_args().mammoth)))
    ours = ours_run()
    print(f"stock Mammoth: second column minus the column alone, max |diff| {mammoth['stock_gap']:.3g} "
          f"(0: its laterals are never used); first column unchanged by the second's steps: "
          f"{mammoth['first_unchanged']}")
    print(f"{'quantity':<34} {'max |Mammoth - ours|':>22}")
    for key in ("first_logits", "second_logits"):
        print(f"{key:<34} {(mammoth[key] - ours[key]).abs().max().item():>22.3g}")
    for key in ("first_losses", "second_losses"):
        print(f"{key:<34} {np.abs(np.subtract(mammoth[key], ours[key])).max():>22.3g}")
    for name in column_two_weights():
        gap = (mammoth["second_after"][name] - ours["second_after"][name]).abs().max().item()
        print(f"{name + ' after':<34} {gap:>22.3g}")
    print("\n# Mammoth's numbers, for tests/test_method_pnn.py")
    print(f"MAMMOTH_FIRST_LOGITS = {checksums(mammoth['first_logits'])}")
    print(f"MAMMOTH_FIRST_LOSSES = {mammoth['first_losses']}")
    print(f"MAMMOTH_SECOND_LOGITS = {checksums(mammoth['second_logits'])}")
    print(f"MAMMOTH_SECOND_LOSSES = {mammoth['second_losses']}")
    print("MAMMOTH_SECOND_AFTER = {")
    for name, value in mammoth["second_after"].items():
        print(f"    {name!r}: {checksums(value)},")
    print("}")


if __name__ == "__main__":
    main()
