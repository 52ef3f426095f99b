"""GEM and GSS against Mammoth's models/gem.py and models/gss.py, in one process, from the same weights.

    /work/mammoth-venv/bin/python benchmarks/mammoth_parity_gem_gss.py compare     # both sides, a table
    /work/mammoth-venv/bin/python benchmarks/mammoth_parity_gem_gss.py reference   # the numbers the tests pin

Run with Mammoth's interpreter (its code needs quadprog and its own dependencies); Mammoth's packages
are imported first from its work tree and then dropped from sys.modules, as in
benchmarks/mammoth_parity_lockstep.py, whose fixed MLP weights and integer-formula images this reuses.
Both sides: the 784-100-100-10 MLP on seq-mnist's tasks (classes 2t, 2t + 1), SGD, CPU, one thread;
ours reads the scenario's images from idx files, Mammoth's gets them as its MNIST pipeline gives them
(PIL image → ToTensor).

GEM: every task has 4 training examples and the memory keeps 20 // 5 = 4 of each, so each finished
task's memory is the whole task and no random choice matters (Mammoth's `fill_buffer`, class-balanced
at e75a491, is replaced by one that stores the task's 4 examples: the memory both sides project
against is the same). 3 tasks of 3 steps, batch 4: the last task's steps solve QPs with two
constraints.

GSS: no draw is replaced. Both sides start from the same seeds (torch and numpy global generators) and
draw in Mammoth's order (the replay permutation from torch, the scored subset and the replacement
draws from numpy), so they make the same choices. Buffer 8, batch 4, replay minibatch 3, subset 4,
--batch_num 2; 3 tasks of 3, 3, 2 steps over each task's 8 training examples: the buffer fills in
task 0 and later batches replace stored examples by GSS's rule.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import ToTensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.mammoth_parity_lockstep import (import_from_mammoth, PARAMETERS, checksums,  # noqa: E402
                                                scenario_images, scenario_weights)

SEED = 0
GEM = {"lr": 0.03, "batch_size": 4, "buffer_size": 20, "minibatch_size": 4, "gamma": 0.5, "n_train": 20,
       "steps": (3, 3, 3)}
GSS = {"lr": 0.1, "batch_size": 4, "buffer_size": 8, "minibatch_size": 3, "gss_minibatch_size": 4,
       "batch_num": 2, "n_train": 40, "steps": (3, 3, 2)}


# -- the scenario ------------------------------------------------------------------------------------
def training_set(scenario: dict) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, 28, 28] and labels i mod 10: n / 10 examples of each class."""
    n = scenario["n_train"]
    return scenario_images(n), np.arange(n) % 10


def task_rows(scenario: dict, task: int) -> np.ndarray:
    """The task's training rows in dataset order (its classes 2t and 2t + 1)."""
    labels = training_set(scenario)[1]
    return np.flatnonzero(labels // 2 == task)


def scenario_batches(scenario: dict) -> list[tuple[int, np.ndarray]]:
    """(task, dataset rows) of every step: the task's rows cut into batches, cycled, rotated each pass."""
    out = []
    for task, steps in enumerate(scenario["steps"]):
        rows = task_rows(scenario, task)
        batches = [rows[i:i + scenario["batch_size"]] for i in range(0, len(rows), scenario["batch_size"])]
        for step in range(steps):
            out.append((task, np.roll(batches[step % len(batches)], step)))
    return out


def write_mnist(scenario: dict, data_path: Path) -> None:
    """The scenario's training set as MNIST idx files under data_path/MNIST/raw (the test set: the same)."""
    from tests.test_dataset_files import MNIST_NAMES, write_idx

    folder = Path(data_path) / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = training_set(scenario)
    for name, array in zip(MNIST_NAMES, (images, labels, images, labels)):
        write_idx(folder / name, array)


def weights_of(net, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The MLP's weights under our names (`names`: our layer name → the network's)."""
    return {f"{o}.{k}": net.get_parameter(f"{names[o]}.{k}").detach() for _, o in PARAMETERS for k in ("weight", "bias")}


# -- ours ---------------------------------------------------------------------------------------------
def ours_model(name: str, data_path: Path):
    """Our gem or gss on the scenario's seq-mnist, with the scenario's weights; returns (model, dataset)."""
    from backbones import BACKBONES
    from continual.args import parse_args
    from datasets import DATASETS
    from models import MODELS

    scenario = GEM if name == "gem" else GSS
    write_mnist(scenario, data_path)
    keys = ["lr", "batch_size", "buffer_size", "minibatch_size"] + (
        ["gamma"] if name == "gem" else ["gss_minibatch_size", "batch_num"])
    args = parse_args(["--model", name, "--dataset", "seq-mnist", "--data_path", str(data_path), "--seed", str(SEED),
                       "--device", "cpu", "--mlp_hidden", "100,100",
                       *[token for key in keys for token in (f"--{key}", str(scenario[key]))]])
    dataset = DATASETS.get("seq-mnist")(args)
    model = MODELS.get(name)(BACKBONES.get("mlp")(args, dataset.SHAPE, dataset.N_CLASSES), dataset, args)
    with torch.no_grad():
        for key, value in scenario_weights().items():
            model.net.get_parameter(key).copy_(value)
    return model, dataset


def run_ours(name: str, data_path: Path) -> dict:
    """The scenario through our model, as the task loop runs it; the numbers `reference` prints for Mammoth."""
    model, dataset = ours_model(name, data_path)
    scenario = GEM if name == "gem" else GSS
    projections = []
    if name == "gem":  # count the steps whose gradient was projected
        import models.gem as gem_module

        project = gem_module.project
        gem_module.project = lambda *a, **k: projections.append(1) or project(*a, **k)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    losses, current = [], None
    try:
        for task, rows in scenario_batches(scenario):
            if task != current:
                if current is not None:
                    model.lifecycle.end_task(current)
                model.lifecycle.begin_task(task)
                current = task
            split = dataset.train_split(task)
            at = [int(np.flatnonzero(split.indices.numpy() == r)[0]) for r in rows]
            raw, labels, indices = split.images[at], split.labels[at], split.indices[at]
            loss = model.lifecycle.observe(dataset.train_transform(raw), labels, raw, indices, task)
            model.lifecycle.step(loss)
            losses.append(loss.item())
        model.lifecycle.end_task(current)
    finally:
        if name == "gem":
            gem_module.project = project
    result = {"losses": losses, "weights": checksums(weights_of(model.net, {o: o for _, o in PARAMETERS}))}
    if name == "gem":
        result["projections"] = len(projections)
    else:
        stored = model.buffer.get_all()
        result.update(buffer_indices=stored["indices"].tolist(),
                      scores=[float(s) for s in model.buffer.policy.scores])
    return result


# -- Mammoth ------------------------------------------------------------------------------------------
def import_mammoth(root: Path) -> SimpleNamespace:
    """Mammoth's MLP, seq-mnist and its gem and gss modules."""
    return import_from_mammoth(root, {"net": "backbone.MNISTMLP:BaseMNISTMLP",
                                      "SequentialMNIST": "datasets.seq_mnist:SequentialMNIST",
                                      "gem": "models.gem", "gss": "models.gss"})


def mammoth_model(mammoth: SimpleNamespace, name: str):
    """Mammoth's gem or gss on its seq-mnist, with the scenario's weights and hyperparameters."""
    scenario = GEM if name == "gem" else GSS
    args = argparse.Namespace(
        seed=SEED, lr=scenario["lr"], batch_size=scenario["batch_size"], buffer_size=scenario["buffer_size"],
        minibatch_size=scenario["minibatch_size"], gamma=scenario.get("gamma"),
        gss_minibatch_size=scenario.get("gss_minibatch_size"), batch_num=scenario.get("batch_num"),
        optimizer="sgd", optim_wd=0.0, optim_mom=0.0, optim_nesterov=False, label_perc=1, label_perc_by_class=1,
        joint=0, custom_task_order=None, custom_class_order=None, permute_classes=0, nowand=True, validation=None,
        validation_mode="current", noise_rate=0.0, num_workers=0, drop_last=False, debug_mode=False,
        eval_future=False, non_verbose=True)
    dataset = mammoth.SequentialMNIST(args)
    net = mammoth.net(28 * 28, dataset.N_CLASSES)
    names = dict((o, m) for m, o in PARAMETERS)
    with torch.no_grad():
        for key, value in scenario_weights().items():
            layer, _, kind = key.rpartition(".")
            net.get_parameter(f"{names[layer]}.{kind}").copy_(value)
    model_class = mammoth.gem.Gem if name == "gem" else mammoth.gss.Gss
    return model_class(net, dataset.get_loss(), args, dataset.get_transform(), dataset=dataset), dataset


def run_mammoth(mammoth: SimpleNamespace, name: str) -> dict:
    """The scenario through Mammoth's unchanged gem or gss (GEM's memory filled with each task's examples)."""
    model, dataset = mammoth_model(mammoth, name)
    scenario = GEM if name == "gem" else GSS
    images, labels = training_set(scenario)
    to_tensor = ToTensor()
    pixels = torch.stack([to_tensor(Image.fromarray(image, mode="L")) for image in images])
    projections = []
    if name == "gem":
        def fill_buffer(buffer, dataset, t_idx, **kwargs):  # the task's whole training set, as our memory holds
            rows = torch.from_numpy(task_rows(scenario, t_idx))
            buffer.add_data(examples=pixels[rows], labels=torch.from_numpy(labels)[rows],
                            task_labels=torch.full((len(rows),), t_idx))

        project2cone2 = mammoth.gem.project2cone2
        mammoth.gem.fill_buffer = fill_buffer
        mammoth.gem.project2cone2 = lambda *a, **k: projections.append(1) or project2cone2(*a, **k)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    losses, current = [], None
    for task, rows in scenario_batches(scenario):
        if task != current:
            if current is not None:
                model.meta_end_task(dataset)
            model.meta_begin_task(dataset)
            current = task
        inputs = pixels[torch.from_numpy(rows)]
        losses.append(float(model.meta_observe(inputs, torch.from_numpy(labels[rows]), inputs.clone(), epoch=0)))
    model.meta_end_task(dataset)
    result = {"losses": losses, "weights": checksums(weights_of(model.net, dict((o, m) for m, o in PARAMETERS)))}
    if name == "gem":
        result["projections"] = len(projections)
    else:  # the dataset rows in each slot: the stored images are the scenario's, all distinct
        stored = (model.buffer.examples * 255).round().to(torch.uint8)
        flat = torch.from_numpy(images).reshape(len(images), -1)
        result.update(buffer_indices=[int((flat == s.reshape(1, -1)).all(1).nonzero()[0]) for s in stored],
                      scores=[float(s) for s in model.buffer.scores])
    return result


def largest_difference(a, b) -> float:
    """The largest absolute difference between two nested results of the same shape."""
    if isinstance(a, dict):
        return max(largest_difference(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return max(largest_difference(x, y) for x, y in zip(a, b)) if len(a) == len(b) else float("inf")
    return abs(float(a) - float(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("compare", "reference"))
    parser.add_argument("--mammoth", type=Path, default=Path("/work/mammoth"))
    cli = parser.parse_args()
    torch.set_num_threads(1)  # the same summation order on both sides, on any machine
    mammoth = import_mammoth(cli.mammoth)
    reference = {name: run_mammoth(mammoth, name) for name in ("gem", "gss")}
    if cli.mode == "reference":
        print("RESULT " + json.dumps(reference))
        return
    import tempfile

    print(f"{'model':6} {'quantity':16} {'largest |Mammoth - ours|':>26}")
    for name in ("gem", "gss"):
        with tempfile.TemporaryDirectory() as folder:
            ours = run_ours(name, Path(folder))
        for key in reference[name]:
            print(f"{name:6} {key:16} {largest_difference(reference[name][key], ours[key]):26.3g}")
        print(f"{name:6} mammoth          {json.dumps(reference[name])}")
        print(f"{name:6} ours             {json.dumps(ours)}")


if __name__ == "__main__":
    main()
