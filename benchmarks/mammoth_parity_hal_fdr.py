"""Mammoth's HAL and FDR against ours, step by step from the same weights on the same batches and draws.

    /work/mammoth-venv/bin/python benchmarks/mammoth_parity_hal_fdr.py [--mammoth /work/mammoth]

Prints, per method, Mammoth's numbers, ours and their largest relative difference, then `RESULT {json}`
with Mammoth's numbers, which tests/test_method_hal.py and tests/test_method_fdr.py pin. Mammoth's classes
are imported first from its work tree and taken out of `sys.modules`, as in
`benchmarks/mammoth_parity_lockstep.py`, whose fixed MLP weights (784-100-100-10, `scenario_weights`) and
integer-formula images both sides start from; seq-mnist's tasks of two classes, SGD without momentum.

Each scenario leaves no random choice that matters: every buffer draw asks for at least the whole
buffer (the losses are means, so the order of a draw does not matter) and the buffers never overwrite.

- HAL: batch 6, task 0 one step, task 1 two steps; buffer 30, replayed whole (Mammoth's ring gives each
  of seq-mnist's 5 tasks 6 slots, which task 0 fills exactly, and task 1 its next 6, as our reservoir
  fills its first 12 slots). Anchors of classes 0 and 1 learned at the end of task 0 (100 steps each,
  the fine-tuning batch of 6 is the whole buffer); their uniform starting points are drawn after
  `torch.manual_seed(ANCHOR_SEED)` on both sides (Mammoth draws them one class after another and
  draws nothing else from torch's generator in between, ours draws them first, in the same order).
  Mammoth's get_anchors gives its spare network θ through `vector_to_parameters`, which makes the
  parameters views of that vector, so the fine-tuning writes θ_m into θ and the anchors' two
  cross-entropies cancel; ours keeps θ (the paper's). `hal` is Mammoth as it is, `hal_unaliased`
  Mammoth with the spare network's `set_params` given a copy of the vector: ours matches the latter.
- FDR: batch 4, three tasks of three steps (each task's whole training split, 12 examples), buffer 24
  replayed whole. The end of task 0 stores all 12 examples of task 0 (both sides: share 24); the end of
  task 1 keeps those 12 and adds all 12 of task 1 (ours: share 24 // 2 = 12 per task; Mammoth's e75a491
  share is 24 // 1, which keeps the same 24 here since nothing overflows).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.mammoth_parity_lockstep import (import_from_mammoth, PARAMETERS, scenario_images,  # noqa: E402
                                                scenario_weights)

HAL = {"lr": 0.1, "batch_size": 6, "buffer_size": 30, "minibatch_size": 30, "hal_lambda": 0.1, "beta": 0.5,
       "gamma": 0.1, "steps": (1, 2)}
FDR = {"lr": 0.1, "batch_size": 4, "buffer_size": 24, "minibatch_size": 24, "alpha": 1.0, "steps": (3, 3, 3)}
ANCHOR_SEED = 0


# -- the scenarios ----------------------------------------------------------------------------------
def scenario_data(scenario: dict) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, 28, 28] and labels of every step, in stream order: task t's rows have classes 2t, 2t + 1."""
    batch, steps = scenario["batch_size"], scenario["steps"]
    images = scenario_images(batch * sum(steps))
    labels = np.concatenate([2 * t + (np.arange(batch * s) % 3 == 0) for t, s in enumerate(steps)]).astype(np.int64)
    return images, labels


def scenario_batches(scenario: dict) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(task, dataset rows, uint8 images, labels) of every step."""
    images, labels = scenario_data(scenario)
    batch, out, start = scenario["batch_size"], [], 0
    for task, steps in enumerate(scenario["steps"]):
        for _ in range(steps):
            rows = np.arange(start, start + batch)
            out.append((task, rows, images[rows], labels[rows]))
            start += batch
    return out


def checksums(tensor: torch.Tensor) -> list[float]:
    """Sum and sum of squares in float64, and the first entry."""
    return [tensor.double().sum().item(), tensor.double().square().sum().item(), tensor.flatten()[0].item()]


def weight_checksums(net, rename: bool) -> dict[str, list[float]]:
    names = {o: m for m, o in PARAMETERS} if rename else {o: o for _, o in PARAMETERS}
    return {f"{o}.{k}": checksums(net.get_parameter(f"{names[o]}.{k}").detach())
            for _, o in PARAMETERS for k in ("weight", "bias")}


# -- ours -------------------------------------------------------------------------------------------
def write_scenario_mnist(root: Path, scenario: dict) -> None:
    """The scenario's images as seq-mnist's idx files under root/MNIST/raw (train and test the same)."""
    from benchmarks.engine_throughput import write_idx
    from datasets.mnist import FILES

    images, labels = scenario_data(scenario)
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in zip(FILES, (images, labels, images, labels)):
        write_idx(folder / name, array)


def ours_model(method: str, scenario: dict, data_path: str):
    """Our model on seq-mnist's 784-100-100-10 mlp with the scenario's weights and flags."""
    from backbones import BACKBONES
    from continual.args import parse_args
    from datasets import DATASETS
    from models import MODELS

    own = ["--hal_lambda", scenario.get("hal_lambda"), "--beta", scenario.get("beta"), "--gamma",
           scenario.get("gamma")] if method == "hal" else ["--alpha", scenario.get("alpha")]
    args = parse_args([str(a) for a in ["--model", method, "--dataset", "seq-mnist", "--backbone", "mlp",
                                        "--mlp_hidden", "100,100", "--lr", scenario["lr"], "--batch_size",
                                        scenario["batch_size"], "--buffer_size", scenario["buffer_size"],
                                        "--minibatch_size", scenario["minibatch_size"], "--seed", 0, "--device",
                                        "cpu", "--data_path", data_path, *own]])
    torch.manual_seed(0)
    dataset = DATASETS.get("seq-mnist")(args)
    model = MODELS.get(method)(BACKBONES.get("mlp")(args, dataset.SHAPE, dataset.N_CLASSES), dataset, args)
    with torch.no_grad():
        for name, value in scenario_weights().items():
            model.net.get_parameter(name).copy_(value)
    return model, dataset


def run_ours(method: str, data_path: str) -> dict:
    """Our hal or fdr through the scenario as the task loop drives it (observe, step; the task events)."""
    scenario = HAL if method == "hal" else FDR
    model, dataset = ours_model(method, scenario, data_path)
    losses, current, result = [], None, {}
    for task, rows, images, labels in scenario_batches(scenario):
        if task != current:
            if current is not None:
                if method == "hal":
                    torch.manual_seed(ANCHOR_SEED)
                model.lifecycle.end_task(current)
                if method == "fdr":
                    result[f"buffer_logits_after_task_{current}"] = checksums(model.buffer.get_all()["logits"])[:2]
            model.lifecycle.begin_task(task)
            current = task
        raw = torch.from_numpy(images)[:, None]
        loss = model.lifecycle.observe(dataset.train_transform(raw), torch.from_numpy(labels), raw,
                                       torch.from_numpy(rows), task)
        model.lifecycle.step(loss)
        losses.append(loss.item())
    result.update({"losses": losses, "weights": weight_checksums(model.net, rename=False)})
    if method == "hal":
        result["anchors"] = [checksums(a) for a in model.anchors]
    return result


# -- Mammoth ----------------------------------------------------------------------------------------
def import_mammoth(root: Path) -> SimpleNamespace:
    """Mammoth's HAL, FDR, MNISTMLP and seq-mnist."""
    return import_from_mammoth(root, {"net": "backbone.MNISTMLP:BaseMNISTMLP",
                                      "SequentialMNIST": "datasets.seq_mnist:SequentialMNIST",
                                      "hal": "models.hal:HAL", "fdr": "models.fdr:Fdr"})


def mammoth_model(mammoth: SimpleNamespace, method: str, scenario: dict):
    """Mammoth's hal or fdr on its seq-mnist with the scenario's weights, as its main.py builds it."""
    args = argparse.Namespace(
        seed=0, lr=scenario["lr"], batch_size=scenario["batch_size"], buffer_size=scenario["buffer_size"],
        minibatch_size=scenario["minibatch_size"], optimizer="sgd", optim_wd=0.0, optim_mom=0.0,
        optim_nesterov=False, label_perc=1, label_perc_by_class=1, joint=0, custom_task_order=None,
        custom_class_order=None, permute_classes=0, nowand=True, validation=None, validation_mode="current",
        noise_rate=0.0, num_workers=0, drop_last=False, debug_mode=False, eval_future=False, non_verbose=True,
        dataset="seq-mnist", hal_lambda=scenario.get("hal_lambda"), beta=scenario.get("beta"),
        gamma=scenario.get("gamma"), alpha=scenario.get("alpha"))
    dataset = mammoth.SequentialMNIST(args)
    cls = mammoth.hal if method == "hal" else mammoth.fdr
    if method == "hal":  # HAL builds its spare network and reads N_TASKS through Mammoth's registries
        cls.__init__.__globals__["get_dataset"] = lambda _: dataset
        cls.__init__.__globals__["get_backbone"] = lambda _: mammoth.net(28 * 28, dataset.N_CLASSES)
    torch.manual_seed(0)
    model = cls(mammoth.net(28 * 28, dataset.N_CLASSES), dataset.get_loss(), args, dataset.get_transform(),
                dataset=dataset)
    weights = scenario_weights()
    with torch.no_grad():
        for m, o in PARAMETERS:
            for k in ("weight", "bias"):
                model.net.get_parameter(f"{m}.{k}").copy_(weights[f"{o}.{k}"])
    return model, dataset


def task_view(dataset, scenario: dict, task: int):
    """The dataset as Mammoth's end_task reads it for `task`: its train loader over the task's rows
    (batches of (inputs, labels, not-augmented inputs)) and their targets."""
    batches = [b for b in scenario_batches(scenario) if b[0] == task]
    loader = [(torch.from_numpy(im)[:, None].float() / 255, torch.from_numpy(lab), torch.from_numpy(im)[:, None].float()
               / 255) for _, _, im, lab in batches]
    targets = np.concatenate([lab for _, _, _, lab in batches])
    return SimpleNamespace(N_CLASSES_PER_TASK=dataset.N_CLASSES_PER_TASK, N_TASKS=dataset.N_TASKS,
                           train_loader=_Loader(loader, targets))


class _Loader(list):
    """A list of batches that also answers `.dataset.targets`, as a torch DataLoader over the task does."""

    def __init__(self, batches, targets):
        super().__init__(batches)
        self.dataset = SimpleNamespace(targets=targets)


def run_mammoth(mammoth: SimpleNamespace, method: str, unaliased: bool = False) -> dict:
    """Mammoth's method through the scenario. `unaliased` (HAL): its spare network's `set_params` copies
    the vector it is given instead of making the parameters views of it (see the module docstring)."""
    scenario = HAL if method == "hal" else FDR
    model, dataset = mammoth_model(mammoth, method, scenario)
    if unaliased:
        spare = model.spare_model
        spare.set_params = lambda vector: torch.nn.utils.vector_to_parameters(vector.clone(), spare.parameters())
    np.random.seed(0)
    losses, current, result = [], None, {}
    for task, rows, images, labels in scenario_batches(scenario):
        if task != current:
            if current is not None:
                if method == "hal":
                    torch.manual_seed(ANCHOR_SEED)
                model.meta_end_task(task_view(dataset, scenario, current))
                if method == "fdr":
                    n = len(model.buffer)
                    result[f"buffer_logits_after_task_{current}"] = checksums(model.buffer.logits[:n])[:2]
            model.meta_begin_task(dataset)
            current = task
        inputs = torch.from_numpy(images)[:, None].float() / 255  # ToTensor of the uint8 image
        losses.append(float(model.meta_observe(inputs, torch.from_numpy(labels), inputs.clone(), epoch=0)))
    result.update({"losses": losses, "weights": weight_checksums(model.net, rename=True)})
    if method == "hal":
        result["anchors"] = [checksums(a) for a in model.anchors]
    return result


def largest_difference(a, b) -> float:
    """Largest difference between two nested lists/dicts of numbers, relative to max(|a|, 1)."""
    if isinstance(a, dict):
        return max(largest_difference(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return max(largest_difference(x, y) for x, y in zip(a, b))
    return abs(a - b) / max(abs(a), 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mammoth", type=Path, default=Path("/work/mammoth"))
    cli = parser.parse_args()
    torch.set_num_threads(1)  # one thread: the same summation order on both sides, on any machine
    mammoth = import_mammoth(cli.mammoth)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for method, scenario in (("hal", HAL), ("fdr", FDR)):
            root = Path(folder) / method
            write_scenario_mnist(root, scenario)
            ours = run_ours(method, str(root))
            sides = {method: run_mammoth(mammoth, method)}
            if method == "hal":
                sides["hal_unaliased"] = run_mammoth(mammoth, method, unaliased=True)
            for side, theirs in sides.items():
                results[side] = theirs
                print(f"{side}: losses Mammoth {theirs['losses']}\n{'':5}losses ours    {ours['losses']}")
                for key in theirs:
                    print(f"{'':5}{key}: largest difference {largest_difference(theirs[key], ours[key]):.2e}")
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
