"""Mammoth's models and this repository's, in one process, step by step on the same data and draws.

Run by `benchmarks/mammoth_parity.py` with Mammoth's interpreter (its code needs its own
dependencies; this repository's side needs only torch and numpy here). Mammoth's classes are
imported first from its work tree and then taken out of `sys.modules`, because both repositories
name their packages `models`, `datasets` and `utils`; this repository's are imported after.

`lockstep`: for each model, both sides start from the same weights (Mammoth's MNISTMLP at the seed,
copied into ours) and see the same stream batches in the same order (a seeded permutation of each
task's training rows, batch 10). Ours runs first, unchanged: its `observe`, then the task loop's
optimizer step. Its random choices are read off and replayed on Mammoth's unchanged code: the
buffer slots its reservoir policy gave each row (Mammoth's per-example slot function is replaced
by that list) and the rows each replay batch drew (passed to Mammoth's `Buffer.get_data` as its
`force_indexes`). Mammoth's inputs come from its own dataset class (PIL → ToTensor) at the same
dataset indices. After every step the loss, every gradient, every weight and the buffer (examples,
labels, logits) are compared; the first step where any differs is reported with the quantity.
After every task each side evaluates the seen tasks with its own code (Mammoth's `utils/evaluate.py`
on its own test loaders, ours `continual.evaluation.evaluate`).

`reference`: the fixed DER++ scenario of tests/test_mammoth_parity.py (`SCENARIO` and the
`scenario_*` functions below) run through Mammoth's DER++, printing the numbers the test pins.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import ToTensor

REPO = Path(__file__).resolve().parents[1]
MAMMOTH_PACKAGES = ("models", "utils", "datasets", "backbone")
PARAMETERS = (("fc1", "layers.0"), ("fc2", "layers.1"), ("classifier", "head"))  # Mammoth's name, ours
HYPER = {"lr": 0.1, "batch_size": 10, "buffer_size": 200, "minibatch_size": 10, "alpha": 0.3, "beta": 0.5}
# The regression test's scenario: 784-100-100-10, two tasks of two classes, batch 4, a buffer of 20
# that never fills (no reservoir draw) replayed whole (minibatch 20), so no random choice matters.
SCENARIO = {"lr": 0.1, "batch_size": 4, "buffer_size": 20, "minibatch_size": 20, "alpha": 0.3, "beta": 0.5,
            "steps": (3, 2)}


# -- the regression test's scenario: integer formulas, no random draw --------------------------------
def scenario_images(n: int) -> np.ndarray:
    """uint8 [n, 28, 28]: a stripe pattern per image, from integer arithmetic only."""
    i, r, c = np.meshgrid(np.arange(n), np.arange(28), np.arange(28), indexing="ij")
    return ((i * 37 + r * 11 + c * 5 + (r * c) % 7 * 19) % 256).astype(np.uint8)


def scenario_weights() -> dict[str, torch.Tensor]:
    """Initial weights of the 784-100-100-10 MLP (our names), within each layer's Xavier bound, biases 0."""
    weights = {}
    for k, (name, fan_in, fan_out) in enumerate((("layers.0", 784, 100), ("layers.1", 100, 100), ("head", 100, 10))):
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        o, i = np.meshgrid(np.arange(fan_out), np.arange(fan_in), indexing="ij")
        grid = (o * 7919 + i * 104729 + k * 15485863) % 2001  # 0..2000
        weights[f"{name}.weight"] = torch.from_numpy((grid - 1000) / 1000 * bound).float()
        weights[f"{name}.bias"] = torch.zeros(fan_out)
    return weights


def scenario_batches() -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(task, uint8 images [4, 28, 28], labels) of every step: task 0 has classes 0, 1; task 1 has 2, 3."""
    batch, out, start = SCENARIO["batch_size"], [], 0
    images = scenario_images(batch * sum(SCENARIO["steps"]))
    for task, steps in enumerate(SCENARIO["steps"]):
        for _ in range(steps):
            labels = 2 * task + (np.arange(start, start + batch) % 3 == 0).astype(np.int64)
            out.append((task, images[start:start + batch], labels))
            start += batch
    return out


# -- Mammoth ------------------------------------------------------------------------------------------
def import_from_mammoth(root: Path, names: dict[str, str]) -> SimpleNamespace:
    """Objects of Mammoth's work tree, {attribute: "module:Name" or "module"}, imported before this repository's packages
    (both repositories name theirs `models`, `datasets`, `utils`) and then taken out of sys.modules by name."""
    clash = sorted(n for n in sys.modules if n.partition(".")[0] in MAMMOTH_PACKAGES)
    if clash:
        raise RuntimeError(f"import Mammoth before this repository's packages; already imported: {clash[:5]}")
    cwd, path = os.getcwd(), list(sys.path)
    sys.path.insert(0, str(root))
    try:
        found = {}
        for attribute, spec in names.items():
            module, _, name = spec.partition(":")
            found[attribute] = getattr(importlib.import_module(module), name) if name else importlib.import_module(module)
    finally:
        os.chdir(cwd)  # Mammoth's models/__init__.py changes into its work tree
        sys.path[:] = path
    for module in [n for n in sys.modules if n.partition(".")[0] in MAMMOTH_PACKAGES]:
        del sys.modules[module]
    sys.path.insert(0, str(REPO))
    return SimpleNamespace(**found)


def import_mammoth(root: Path) -> SimpleNamespace:
    """Mammoth's MLP, seq-mnist, evaluation and the four models compared step by step."""
    found = import_from_mammoth(root, {
        "net": "backbone.MNISTMLP:BaseMNISTMLP", "MyMNIST": "datasets.seq_mnist:MyMNIST",
        "SequentialMNIST": "datasets.seq_mnist:SequentialMNIST", "base_path": "utils.conf:base_path",
        "evaluate": "utils.evaluate:evaluate", "der": "models.der:Der", "derpp": "models.derpp:Derpp",
        "er": "models.er:Er", "sgd": "models.sgd:Sgd"})
    found.models = {name: getattr(found, name) for name in ("sgd", "er", "der", "derpp")}
    return found


def mammoth_model(mammoth: SimpleNamespace, name: str, hyper: dict, seed: int):
    """Mammoth's model on its seq-mnist (MNISTMLP 784-100-100-10 built at `seed`), as its main.py builds it."""
    args = argparse.Namespace(
        seed=seed, lr=hyper["lr"], batch_size=hyper["batch_size"], buffer_size=hyper["buffer_size"],
        minibatch_size=hyper["minibatch_size"], alpha=hyper["alpha"], beta=hyper["beta"], optimizer="sgd",
        optim_wd=0.0, optim_mom=0.0, optim_nesterov=False, label_perc=1, label_perc_by_class=1, joint=0,
        custom_task_order=None, custom_class_order=None, permute_classes=0, nowand=True, validation=None,
        validation_mode="current", noise_rate=0.0, num_workers=0, drop_last=False, debug_mode=False,
        eval_future=False, non_verbose=True)
    dataset = mammoth.SequentialMNIST(args)
    torch.manual_seed(seed)
    net = mammoth.net(28 * 28, dataset.N_CLASSES)
    return mammoth.models[name](net, dataset.get_loss(), args, dataset.get_transform(), dataset=dataset), dataset


def ours_model(name: str, hyper: dict, seed: int, data_path: str):
    """This repository's model, from its command line, on seq-mnist read from `data_path`."""
    from backbones import BACKBONES
    from continual.args import parse_args
    from datasets import DATASETS
    from models import MODELS

    flags = {"er": [], "sgd": [], "der": ["--alpha", hyper["alpha"]],
             "derpp": ["--alpha", hyper["alpha"], "--beta", hyper["beta"]]}[name]
    if name != "sgd":
        flags += ["--buffer_size", hyper["buffer_size"], "--minibatch_size", hyper["minibatch_size"]]
    args = parse_args([str(a) for a in ["--model", name, "--dataset", "seq-mnist", "--backbone", "mlp",
                                        "--mlp_hidden", "100,100", "--lr", hyper["lr"], "--batch_size",
                                        hyper["batch_size"], "--seed", seed, "--device", "cpu",
                                        "--data_path", data_path, *flags]])
    torch.manual_seed(seed)
    dataset = DATASETS.get(args.dataset)(args)
    net = BACKBONES.get(args.backbone)(args, dataset.SHAPE, dataset.N_CLASSES)
    return MODELS.get(name)(net, dataset, args), dataset




def pairs(mnet, onet):
    """(name, Mammoth's parameter, ours) for every parameter of the MLP."""
    mp, op = dict(mnet.named_parameters()), dict(onet.named_parameters())
    return [(f"{o}.{k}", mp[f"{m}.{k}"], op[f"{o}.{k}"]) for m, o in PARAMETERS for k in ("weight", "bias")]


# -- lockstep -----------------------------------------------------------------------------------------
class Recorder:
    """Reads off the random choices of our buffer (without changing them) and replays them on Mammoth's."""

    def __init__(self, ours_buffer, mammoth_buffer):
        self.draws: list[np.ndarray] = []
        self.slots: list[int] = []
        if ours_buffer is None:
            return
        get_data, insert = ours_buffer.get_data, ours_buffer.policy.insert

        def recording_get_data(size, transform=None):
            out = get_data(size, transform)
            held = ours_buffer.indices[:len(ours_buffer)].tolist()  # dataset indices: unique in one epoch
            self.draws.append(np.array([held.index(i) for i in out["indices"].tolist()]))
            return out

        def recording_insert(buffer, offered):
            slots, rows = insert(buffer, offered)
            by_row = [-1] * len(offered.labels)  # a row that lost its slot to a later row of the batch is not stored
            for s, r in zip(slots.tolist(), rows.tolist()):
                by_row[r] = s
            self.slots.extend(by_row)
            return slots, rows

        ours_buffer.get_data = recording_get_data
        ours_buffer.policy.insert = recording_insert
        forced_get_data = mammoth_buffer.get_data
        mammoth_buffer.get_data = lambda size, **kw: forced_get_data(size, force_indexes=self.draws.pop(0), **kw)
        mammoth_buffer.sample_selection_fn = lambda n_seen: self.slots.pop(0)

    def settled(self) -> bool:
        return not self.draws and not self.slots


def differences(step_loss, mnet, onet, mbuffer, obuffer) -> dict[str, float]:
    """Largest absolute difference of each compared quantity (0.0 where bit-identical)."""
    diff = {"loss": abs(step_loss[0] - step_loss[1])}
    for name, m, o in pairs(mnet, onet):
        diff[f"grad {name}"] = (m.grad - o.grad).abs().max().item()
        diff[f"weight {name}"] = (m.detach() - o.detach()).abs().max().item()
    if obuffer is not None and len(obuffer):
        n = len(obuffer)
        diff["buffer examples"] = (mbuffer.examples[:n] - obuffer.examples[:n].float() / 255).abs().max().item()
        if hasattr(mbuffer, "labels"):  # Mammoth's DER stores none
            diff["buffer labels"] = float((mbuffer.labels[:n] != obuffer.labels[:n]).sum())
        if hasattr(mbuffer, "logits"):
            diff["buffer logits"] = (mbuffer.logits[:n] - obuffer.logits[:n]).abs().max().item()
    return diff


def lockstep(mammoth: SimpleNamespace, name: str, seed: int, data_path: str, n_tasks: int,
             steps_per_task: int | None) -> dict:
    from continual.evaluation import evaluate

    mmodel, mdataset = mammoth_model(mammoth, name, HYPER, seed)
    omodel, odataset = ours_model(name, HYPER, seed, data_path)
    own_init_equal = all(torch.equal(m, o) for _, m, o in pairs(mmodel.net, omodel.net))
    with torch.no_grad():
        for _, m, o in pairs(mmodel.net, omodel.net):
            o.copy_(m)
    # As Mammoth's SequentialMNIST.get_data_loaders builds its training set (ToTensor, no augmentation).
    mtrain = mammoth.MyMNIST(str(Path(data_path) / "MNIST"), train=True, download=False, transform=ToTensor())
    mammoth.base_path(f"{data_path}/")  # where Mammoth's get_data_loaders reads (its --base_path)
    recorder = Recorder(omodel.buffer, getattr(mmodel, "buffer", None))
    first, worst, step, inputs_equal, accuracy = None, {}, 0, True, []
    for task in range(n_tasks):
        mdataset.get_data_loaders()  # as Mammoth's training loop: its test loaders, up to this task
        mmodel.meta_begin_task(mdataset)
        omodel.lifecycle.begin_task(task)
        split = odataset.train_split(task)
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed * 100 + task))
        batches = order.split(HYPER["batch_size"])[:steps_per_task]
        for rows in batches:
            raw, labels, indices = split.images[rows], split.labels[rows], split.indices[rows]
            items = [mtrain[i] for i in indices.tolist()]
            minputs = torch.stack([it[0] for it in items])
            mlabels = torch.tensor([it[1] for it in items])
            inputs = odataset.train_transform(raw)
            inputs_equal &= torch.equal(minputs, inputs) and torch.equal(mlabels, labels)
            oloss = omodel.lifecycle.observe(inputs, labels, raw, indices, task)  # as the task loop calls it
            omodel.lifecycle.step(oloss)
            mloss = mmodel.meta_observe(minputs, mlabels, torch.stack([it[2] for it in items]), epoch=0)
            diff = differences((float(mloss), oloss.item()), mmodel.net, omodel.net,
                               getattr(mmodel, "buffer", None), omodel.buffer)
            for key, value in diff.items():
                worst[key] = max(worst.get(key, 0.0), value)
            if first is None and any(v > 0 for v in diff.values()):
                first = (step, task, {k: v for k, v in diff.items() if v > 0})
            step += 1
        omodel.lifecycle.end_task(task)
        mmodel.meta_end_task(mdataset)
        # Each side's own evaluation of the seen tasks (test set), class-IL then task-IL.
        mine = evaluate(omodel, odataset, task)
        accuracy.append({"mammoth": [list(v) for v in mammoth.evaluate(mmodel, mdataset)],
                         "ours": [mine["class_il"].tolist(), mine["task_il"].tolist()]})
    return {"model": name, "steps": step, "own_init_equal": own_init_equal, "inputs_equal": inputs_equal,
            "draws_replayed": recorder.settled(), "first_difference": first, "worst": worst, "accuracy": accuracy}


# -- reference ----------------------------------------------------------------------------------------
def checksums(named: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per tensor: sum and sum of squares in float64, and the first entry (what the test pins)."""
    return {k: [v.double().sum().item(), v.double().square().sum().item(), v.flatten()[0].item()]
            for k, v in named.items()}


def reference(mammoth: SimpleNamespace) -> dict:
    """The regression test's DER++ scenario through Mammoth's own DER++ (its draws: the whole buffer)."""
    model, dataset = mammoth_model(mammoth, "derpp", SCENARIO, seed=0)
    weights = scenario_weights()
    with torch.no_grad():
        for m, o in PARAMETERS:
            for k in ("weight", "bias"):
                model.net.get_parameter(f"{m}.{k}").copy_(weights[f"{o}.{k}"])
    np.random.seed(0)
    losses, task_now = [], None
    to_tensor = ToTensor()
    for task, images, labels in scenario_batches():
        if task != task_now:
            if task_now is not None:
                model.meta_end_task(dataset)
            model.meta_begin_task(dataset)
            task_now = task
        inputs = torch.stack([to_tensor(Image.fromarray(image, mode="L")) for image in images])
        losses.append(float(model.meta_observe(inputs, torch.from_numpy(labels), inputs.clone(), epoch=0)))
    final = {o + "." + k: model.net.get_parameter(f"{m}.{k}").detach() for m, o in PARAMETERS
             for k in ("weight", "bias")}
    n = len(model.buffer)
    return {"losses": losses, "weights": checksums(final), "buffer_logits": checksums({"logits": model.buffer.logits[:n]})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("lockstep", "reference"))
    parser.add_argument("--mammoth", type=Path, default=Path("/work/mammoth"))
    parser.add_argument("--data_path", default=None, help="lockstep: a folder holding MNIST/raw, "
                        "MNIST/MNIST/raw and MNIST/MyMNIST/raw (benchmarks/mammoth_parity.py writes it)")
    parser.add_argument("--models", default="derpp,er,der,sgd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=5, help="lockstep: tasks to run (each a whole epoch of it)")
    parser.add_argument("--steps_per_task", type=int, default=None, help="lockstep: at most this many steps a task")
    cli = parser.parse_args()
    torch.set_num_threads(1)  # one thread: the same summation order on both sides, on any machine
    mammoth = import_mammoth(cli.mammoth)
    if cli.mode == "reference":
        print("RESULT " + json.dumps(reference(mammoth)))
        return
    results = [lockstep(mammoth, name, cli.seed, cli.data_path, cli.tasks, cli.steps_per_task)
               for name in cli.models.split(",")]
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
