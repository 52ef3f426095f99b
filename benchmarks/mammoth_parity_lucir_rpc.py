"""Mammoth's LUCIR and RPC on the fixed scenarios that tests/test_method_lucir.py and tests/test_method_rpc.py
run through this repository's `lucir` and `rpc`: prints the numbers those tests pin.

Run with Mammoth's interpreter: `python benchmarks/mammoth_parity_lucir_rpc.py [--mammoth /work/mammoth]`.
Mammoth's classes are imported from its work tree and then taken out of `sys.modules` (both repositories
name their packages `models`, `datasets`, `utils`), as in benchmarks/mammoth_parity_lockstep.py.

The scenarios (`SCENARIOS`) need no random draw to agree: 60 integer-formula MNIST images (image i has
label i % 10), the 784-100-100-10 MLP with the integer-formula weights of mammoth_parity_lockstep
(LUCIR's cosine classifier takes the head's rows, σ = 1), SGD at lr 0.1 without momentum, two tasks of
Mammoth's seq-mnist, each of two steps on fixed dataset rows (the second task's batches append fixed
slots of the buffer). LUCIR: a buffer of 10 and batch size 10, so each finetuning epoch is one batch of
the whole buffer, whose order does not matter. RPC (`--loss_on_polytope 0`, Mammoth's training on raw
outputs): a buffer of 11 replayed whole. RPC's task-end choice draws torch.randperm twice (the quota's
remainder, then an order of the task's examples): Mammoth's loader here draws its order when iterated, so
with the same seed before `end_task` both sides draw the same. Mammoth's LUCIR finetuning calls
torch.cuda.synchronize() unconditionally; on the CPU that call is replaced by a no-op.

Mammoth's two counter slips are neutralised where they differ from the method as first written (the
models' docstrings say why): LUCIR's distillation weight is set to lamda_base · sqrt(old / new classes)
after each task, and RPC's `end_task` runs with its task counter one ahead.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: this repository's `benchmarks` package
    sys.path.append(str(REPO))
from benchmarks.mammoth_parity_lockstep import import_from_mammoth, scenario_images, scenario_weights  # noqa: E402

N_TRAIN = 60
SCENARIOS = {
    "lucir": {"lr": 0.1, "batch_size": 10, "buffer_size": 10, "minibatch_size": 10,
              # (task, dataset rows, buffer slots appended)
              "steps": [(0, [0, 1, 10, 11, 20, 21], []), (0, [30, 31, 40, 41, 50, 51], []),
                        (1, [2, 3, 12, 13], [0, 5]), (1, [22, 23, 32, 33], [1, 6])]},
    "rpc": {"lr": 0.1, "batch_size": 6, "buffer_size": 11, "minibatch_size": 11, "end_task_seed": 7,
            "steps": [(0, [0, 1, 10, 11, 20, 21], []), (0, [30, 31, 40, 41, 50, 51], []),
                      (1, [2, 3, 12, 13, 22, 23], []), (1, [32, 33, 42, 43, 52, 53], [])]},
}
EVAL_ROWS = list(range(0, 60, 7))  # images whose evaluation logits are compared


def train_images() -> tuple[np.ndarray, np.ndarray]:
    return scenario_images(N_TRAIN), np.arange(N_TRAIN) % 10


def checksums(tensor: torch.Tensor) -> list[float]:
    """Sum, sum of squares (float64) and the first entry: what the tests pin."""
    return [tensor.double().sum().item(), tensor.double().square().sum().item(), tensor.flatten()[0].item()]


class TaskData(torch.utils.data.Dataset):
    """A task's training examples as Mammoth's MyMNIST serves them: (image, label, unaugmented image)."""

    def __init__(self, rows: np.ndarray):
        images, labels = train_images()
        self.data = torch.from_numpy(images[rows])
        self.targets = labels[rows]
        self.not_aug_transform = True  # Mammoth's icarl_replay refolds buffer images into uint8 data

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        image = self.data[i].float()[None] / 255
        return image, int(self.targets[i]), image.clone()


class DrawnOrder:
    """A loader whose batch order is drawn (torch.randperm) when it is iterated, as our rpc draws it."""

    def __init__(self, dataset: TaskData, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size

    def __iter__(self):
        order = torch.randperm(len(self.dataset))
        for start in range(0, len(order), self.batch_size):
            items = [self.dataset[i] for i in order[start:start + self.batch_size].tolist()]
            yield (torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items]),
                   torch.stack([it[2] for it in items]))


def import_mammoth(root: Path):
    found = import_from_mammoth(root, {"net": "backbone.MNISTMLP:BaseMNISTMLP",
                                       "SequentialMNIST": "datasets.seq_mnist:SequentialMNIST",
                                       "lucir": "models.lucir:Lucir", "rpc": "models.rpc:RPC"})
    return found.net, found.SequentialMNIST, {"lucir": found.lucir, "rpc": found.rpc}


def mammoth_args(hyper: dict) -> argparse.Namespace:
    return argparse.Namespace(
        dataset="seq-mnist", seed=0, lr=hyper["lr"], batch_size=hyper["batch_size"], buffer_size=hyper["buffer_size"],
        minibatch_size=hyper["minibatch_size"], n_epochs=1, optimizer="sgd", optim_wd=0.0, optim_mom=0.0,
        optim_nesterov=False, lamda_base=5.0, lamda_mr=1.0, k_mr=2, mr_margin=0.5, fitting_epochs=20,
        lr_finetune=0.01, imprint_weights=1, label_perc=1, label_perc_by_class=1, joint=0, custom_task_order=None,
        custom_class_order=None, permute_classes=0, nowand=True, validation=None, validation_mode="current",
        noise_rate=0.0, num_workers=0, drop_last=False, debug_mode=False, eval_future=False, non_verbose=True,
        start_from=None, stop_after=None)


def task_rows(task: int) -> np.ndarray:
    labels = train_images()[1]
    return np.nonzero((labels >= 2 * task) & (labels < 2 * task + 2))[0]


def run(mammoth, name: str) -> dict:
    net_class, dataset_class, models = mammoth
    hyper = SCENARIOS[name]
    args = mammoth_args(hyper)
    dataset = dataset_class(args)
    np.random.seed(0)  # Mammoth's replay draw (the whole buffer: only its order, so the float rounding)
    torch.manual_seed(0)
    net = net_class(28 * 28, dataset.N_CLASSES)
    # LUCIR builds its own dataset by name, which would search this repository's `datasets` now.
    models[name].__init__.__globals__["get_dataset"] = lambda _: dataset
    model = models[name](net, dataset.get_loss(), args, dataset.get_transform(), dataset=dataset)
    weights = scenario_weights()
    with torch.no_grad():
        for mine, ours in (("fc1", "layers.0"), ("fc2", "layers.1")):
            for k in ("weight", "bias"):
                model.net.get_parameter(f"{mine}.{k}").copy_(weights[f"{ours}.{k}"])
        if name == "lucir":
            for t, block in enumerate(model.net.classifier.weights):
                block.copy_(weights["head.weight"][2 * t:2 * t + 2])
        else:
            model.net.classifier.weight.copy_(weights["head.weight"])
            model.net.classifier.bias.copy_(weights["head.bias"])
    fit_losses: list[float] = []
    if name == "lucir":
        observe = model.observe

        def recording_observe(*a, **kw):
            loss = observe(*a, **kw)
            if kw.get("fitting"):
                fit_losses.append(loss)
            return loss
        model.observe = recording_observe
    images, labels = train_images()
    out = {"losses": [], "buffer": [], "imprinted": None}
    current = None
    for task, rows, slots in hyper["steps"] + [(None, None, None)]:
        if task != current:
            if current is not None:
                data = TaskData(task_rows(current))
                dataset.train_loader = DrawnOrder(data, hyper["batch_size"])
                dataset.train_loader.dataset = data
                if name == "rpc":
                    torch.manual_seed(hyper["end_task_seed"])
                    if current > 0:  # the quota over the seen classes, as the formula was written
                        model._current_task += 1
                        model.end_task(dataset)
                    else:
                        model.meta_end_task(dataset)
                else:
                    model.meta_end_task(dataset)
                    model.lamda_cos_sim = args.lamda_base * math.sqrt(2 * (current + 1) / 2)
                n = len(model.buffer)
                out["buffer"].append({"labels": model.buffer.labels[:n].tolist(),
                                      "example_sums": model.buffer.examples[:n].flatten(1).double().sum(1).tolist()})
            if task is None:
                break
            data = TaskData(task_rows(task))
            dataset.train_loader = torch.utils.data.DataLoader(data, batch_size=hyper["batch_size"])
            model.meta_begin_task(dataset)
            if name == "lucir" and task == 1:
                out["imprinted"] = checksums(model.net.classifier.weights[1].detach())
            current = task
        inputs = torch.from_numpy(images[rows]).float()[:, None] / 255
        batch_labels = torch.from_numpy(labels[rows])
        if slots:
            inputs = torch.cat([inputs, model.buffer.examples[slots]])
            batch_labels = torch.cat([batch_labels, model.buffer.labels[slots]])
        out["losses"].append(float(model.meta_observe(inputs, batch_labels, inputs.clone(), epoch=0)))
    named = dict(model.net.named_parameters())
    out["weights"] = {k: checksums(v.detach()) for k, v in named.items()}
    out["fit_losses"] = fit_losses
    model.net.eval()
    with torch.no_grad():
        out["eval_logits"] = checksums(model(torch.from_numpy(images[EVAL_ROWS]).float()[:, None] / 255))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mammoth", type=Path, default=Path("/work/mammoth"))
    parser.add_argument("--models", default="lucir,rpc")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    # Mammoth's LUCIR finetuning calls torch.cuda.synchronize() unconditionally, which fails without a GPU;
    # on the CPU there is nothing to wait for.
    torch.cuda.synchronize = lambda *a, **k: None
    mammoth = import_mammoth(cli.mammoth)
    print("RESULT " + json.dumps({name: run(mammoth, name) for name in cli.models.split(",")}))


if __name__ == "__main__":
    main()
