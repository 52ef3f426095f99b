"""Training the models of a subset-training plan, one at a time or as a vectorised ensemble (torch.func).

A worker rebuilds the dataset from the plan, trains a group of models on their subsets and writes
each model's predictions (softmax probability of the training label and 0/1 correctness, on every
training and test example, at every recorded epoch) and its forgetting events (memorization/forgetting.py)
into the store.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time
from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from backbones import BACKBONES
from backbones.mlp import MLP
from datasets import DATASETS
from memorization.forgetting import ForgettingEvents
from memorization.plan import Plan, fingerprint
from memorization.stacked_mlp import StackedMLP
from memorization.store import SubsetStore
from utils.errors import ConfigError
from utils.optimizers import build_optimizer, build_schedule

EVAL_BATCH = 1024


@dataclass
class PlanData:
    """The plan's training and test examples on the device, with the dataset's transforms."""

    dataset: object
    train_images: torch.Tensor  # uint8 [n, C, H, W], input noise applied
    train_labels: torch.Tensor  # int64 [n], label noise applied
    test_images: torch.Tensor
    test_labels: torch.Tensor


def dataset_args(settings: dict, data_path: str, device: str, download: bool = False) -> argparse.Namespace:
    """The arguments a registered dataset needs, from the plan's settings (its own flags at their defaults)."""
    parser = argparse.ArgumentParser(add_help=False)
    DATASETS.get(settings["dataset"]).add_args(parser)
    return argparse.Namespace(**vars(parser.parse_args([])), device=device, n_tasks=None, data_path=data_path,
                              download=download, class_order=None, permute_classes=False,
                              label_noise=settings["label_noise"], seed=settings["seed"])


def class_rows(labels: np.ndarray, classes: list[int] | None) -> np.ndarray:
    """Rows of the examples whose class is in [a, b), or all rows."""
    if classes is None:
        return np.arange(len(labels))
    return np.flatnonzero((labels >= classes[0]) & (labels < classes[1]))


def load_plan_data(plan: Plan, data_path: str, device: str, download: bool = False) -> PlanData:
    """Rebuild exactly the examples the plan was made for, refusing data whose labels changed."""
    settings = plan.settings
    dataset = DATASETS.get(settings["dataset"])(dataset_args(settings, data_path, device, download))
    train_labels = dataset.train.labels.cpu().numpy()
    if fingerprint(train_labels) != settings["label_fingerprint"]:
        raise ConfigError(f"the {settings['dataset']} training labels under {data_path} differ from those the plan "
                          f"was made for (fingerprint); point --data_path at the same files")
    rows = torch.as_tensor(plan.train_indices, device=dataset.train.labels.device)
    images = dataset.train.images.clone()
    noise = torch.as_tensor(plan.input_noise_mask, device=images.device)
    if noise.any():
        generator = torch.Generator().manual_seed(settings["seed"] + 7)
        replacement = torch.randint(0, 256, (int(noise.sum()), *images.shape[1:]), generator=generator,
                                    dtype=torch.uint8)
        images[noise] = replacement.to(images.device)
    test_rows = torch.as_tensor(class_rows(dataset.test.labels.cpu().numpy(), settings["classes"]),
                                device=dataset.test.labels.device)
    return PlanData(dataset, images[rows], dataset.train.labels[rows], dataset.test.images[test_rows],
                    dataset.test.labels[test_rows])


def build_backbones(plan: Plan, model_ids: list[int], data: PlanData, device: str) -> list[nn.Module]:
    settings = plan.settings
    args = argparse.Namespace(**settings["backbone_args"])
    nets = []
    # A model's initialisation depends only on its seed. On the CPU only the CPU's generator is seeded:
    # torch.manual_seed also queues the seeding of every accelerator's, with a stack trace each, 3.6 ms a call.
    seed = torch.default_generator.manual_seed if torch.device(device).type == "cpu" else torch.manual_seed
    for model_id in model_ids:
        seed(int(plan.model_seed[model_id]))
        nets.append(BACKBONES.get(settings["backbone"])(args, data.dataset.SHAPE, data.dataset.N_CLASSES).to(device))
    return nets


def _gradient_layout(stacked: torch.Tensor) -> torch.Tensor:
    """A stacked [K, out, in] weight laid out as [K, in, out] in memory, the layout vmap's gradient comes in.

    Autograd then keeps the gradient as it is instead of copying it through a transpose every step
    (measured: 15-37% of a step for small MLPs, benchmarks/README.md).
    """
    if stacked.dim() != 3:
        return stacked
    return stacked.transpose(1, 2).contiguous().transpose(1, 2)


class Ensemble:
    """K networks of one architecture as one: forward maps [K, B, ...] inputs to [K, B, classes] logits.

    The parameters and buffers are stacked ([K, ...] leaves) and the forward pass is vmapped, so one
    batched kernel serves every model; each model keeps its own parameters, gradients, optimizer
    state and BatchNorm running statistics because the loss is a sum of per-model losses and every
    optimizer update is elementwise. A single model takes the same vmapped path (K = 1): the kernels
    then compute each model's slice the same way whatever the group, so a model's results do not
    depend on which models it was trained with (tests/test_split_ensembles.py).
    """

    def __init__(self, nets: list[nn.Module], training: argparse.Namespace):
        self.size = len(nets)
        params, buffers = stack_module_state(nets)
        self.params = {k: _gradient_layout(v.detach()).requires_grad_() for k, v in params.items()}
        self.buffers = buffers
        self.net = copy.deepcopy(nets[0]).to("meta")  # the architecture only; weights live in self.params
        self.parameters = list(self.params.values())

        def one(p, b, x):
            return functional_call(self.net, (p, b), (x,))
        self._forward = vmap(one, in_dims=(0, 0, 0), randomness="different")
        self._forward_shared = vmap(one, in_dims=(0, 0, None), randomness="different")
        self.optimizer = build_optimizer(self.parameters, training)
        self.smoothing = training.label_smoothing

    def train(self, mode: bool = True) -> None:
        self.net.train(mode)

    def __call__(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        forward = self._forward_shared if shared_input else self._forward
        return forward(self.params, self.buffers, x)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, with_loss: bool = True,
                   correct: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on model k's batch x[k] with labels y[k] ([K, B]): the loss and the logits of the forward
        pass, [K, B, classes]; `correct` [K, B] (bool), when given, receives whether each example's prediction
        (the first of equal maxima, as argmax's) is its label. The loss is the sum of per-model mean losses, so
        each model's gradient is that of its own mean loss (it is returned whatever `with_loss`: the backward
        pass needs it)."""
        with autocast(x.device):
            logits = self(x).float()
        if correct is not None:
            torch.eq(logits.detach().argmax(-1), y, out=correct)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none",
                               label_smoothing=self.smoothing).view_as(y).mean(1).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), logits.detach()


def build_ensemble(nets: list[nn.Module], training: argparse.Namespace) -> Ensemble | StackedMLP:
    """The stacked path for the plain mlp backbone (Linear and ReLU only), the vmapped one for every other."""
    plain = isinstance(nets[0], MLP) and nets[0].norms is None and nets[0].outputs_per_unit == 1
    return StackedMLP(nets, training) if plain else Ensemble(nets, training)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the matrix multiplies dominate); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predictions(ensemble: Ensemble, data: PlanData, images: torch.Tensor, labels: torch.Tensor, save_logits: bool):
    """Per model and example: softmax probability of the label, correctness, and optionally the logits."""
    ensemble.train(False)
    probs, correct, logits_all = [], [], []
    for start in range(0, len(labels), EVAL_BATCH):
        x = data.dataset.test_transform(images[start:start + EVAL_BATCH])
        y = labels[start:start + EVAL_BATCH]
        with autocast(x.device):
            logits = ensemble(x, shared_input=True).float()  # [K, B, classes]
        probs.append(logits.softmax(-1).gather(-1, y.expand(ensemble.size, -1)[..., None])[..., 0])
        correct.append(logits.argmax(-1) == y)
        if save_logits:
            logits_all.append(logits.half())
    ensemble.train(True)
    out = {"prob": torch.cat(probs, 1).half().cpu().numpy(), "correct": torch.cat(correct, 1).cpu().numpy()}
    if save_logits:
        out["logits"] = torch.cat(logits_all, 1).cpu().numpy()
    return out


# Training settings added after the first stores were written, with the values those stores were trained
# with: a plan records a setting only when it differs from this, so older plans keep their hash.
RECIPE_DEFAULTS = {"lr_schedule": "none", "lr_milestones": [0.7, 0.9], "lr_warmup": 0.0, "optim_nesterov": False,
                   "label_smoothing": 0.0}


def recipe(training: dict) -> argparse.Namespace:
    """A plan's training settings with every recipe setting filled in."""
    return argparse.Namespace(**{**RECIPE_DEFAULTS, **training})


class TrainingInputs:
    """The models' training inputs [K, B, ...] and labels [K, B] at each step of an epoch: the dataset's training
    transform, model k's random draws from its own generator, so that a model's augmentation does not depend on
    the other models of its group. Without random augmentation the transform is applied once to every training
    image (the same numbers: the conversion is elementwise), and a step only gathers its rows: converting each
    step's images took 48 µs against 14 µs for gathering them converted (digits, K=16). On the CPU one numba
    kernel gathers a step's images and labels into tensors kept from step to step: in the training loop, where
    the products before it have pushed torch's dispatcher out of the caches, the operators it replaces
    (the rows' copy, the gather, the view, the labels' slice) took about 140 µs a step on digits at K=16.
    Gathering many steps' rows at once was no faster on digits and 6% slower on MNIST-sized images, whose steps
    then came from memory instead of the cache. A step's tensors are valid until the next step.
    """

    def __init__(self, data: PlanData, generators: list[torch.Generator]):
        self.data, self.generators = data, generators
        dataset = data.dataset
        self.fixed = None if dataset.CROP_PADDING or dataset.FLIP else dataset.train_transform(data.train_images)
        self.kernel = self.fixed is not None and self.fixed.device.type == "cpu"
        if self.kernel:
            self.fixed = self.fixed.contiguous()
            self._sources = (self.fixed.numpy().reshape(len(self.fixed), -1), data.train_labels.numpy())
            self._kept: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]] = {}

    def epoch(self, rows: torch.Tensor, batch: int):
        """Each step's (inputs, labels), in order, for an epoch whose rows are `rows` [K, m] (steps of `batch`)."""
        if self.kernel:
            yield from self._gathered(rows, batch)
            return
        images = self.data.train_images if self.fixed is None else self.fixed
        for start in range(0, rows.shape[1], batch):
            step_rows = rows[:, start:start + batch]
            step = images.index_select(0, step_rows.reshape(-1))
            per_model = step.view(rows.shape[0], -1, *images.shape[1:])
            if self.fixed is None:
                transformed = [self.data.dataset.train_transform(x, g) for x, g in zip(per_model, self.generators)]
                per_model = torch.stack(transformed)
            yield per_model, self.data.train_labels[step_rows]

    def _gathered(self, rows: torch.Tensor, batch: int):
        """The CPU's path without augmentation: each step gathered by `_gather_rows` into kept tensors."""
        rows_array = rows.numpy()
        for start in range(0, rows.shape[1], batch):
            shape = (rows.shape[0], min(batch, rows.shape[1] - start))
            if shape not in self._kept:
                x = self.fixed.new_empty(*shape, *self.fixed.shape[1:])
                y = self.data.train_labels.new_empty(shape)
                self._kept[shape] = x, y, x.numpy().reshape(*shape, -1), y.numpy()
            x, y, x_array, y_array = self._kept[shape]
            _gather_rows(*self._sources, rows_array, start, x_array, y_array)
            yield x, y


@numba.njit(cache=True)
def _gather_rows(images: np.ndarray, labels: np.ndarray, rows: np.ndarray, start: int, x: np.ndarray,
                 y: np.ndarray) -> None:
    """x[k, b] = images[rows[k, start + b]] and y[k, b] = labels[rows[k, start + b]]; images [n, F], x [K, B, F]."""
    for k in range(x.shape[0]):
        for b in range(x.shape[1]):
            row = rows[k, start + b]
            y[k, b] = labels[row]
            for f in range(images.shape[1]):  # a loop: the slice assignment x[k, b, :] = ... took 2.7 times as long
                x[k, b, f] = images[row, f]


def epoch_rows(masks: torch.Tensor, subset: torch.Tensor, orders: list[torch.Generator], paired: bool) -> torch.Tensor:
    """[K, m]: the rows each model trains on this epoch, in order, each model shuffled by its own generator.
    `paired` (leave-one-out plans): shuffle all n rows, then drop those outside the mask, so a model without
    example i sees its seed's full-model order with i removed; otherwise shuffle the subset itself."""
    if paired:
        perms = [torch.randperm(masks.shape[1], generator=g).to(masks.device) for g in orders]
        return torch.stack([p[m[p]] for p, m in zip(perms, masks)])
    order = torch.stack([torch.randperm(subset.shape[1], generator=g) for g in orders]).to(subset.device)
    return subset.gather(1, order)


def train_group(plan: Plan, model_ids: list[int], data: PlanData, device: str,
                on_epoch=None) -> dict[int, dict[str, np.ndarray]]:
    """Train the models of one group (same subset ratio) together; returns each model's arrays.

    Everything random in a model's training comes from its own seed (initialisation, order of its
    subset, augmentation), so on the CPU its results are the same bits whatever group it is in. In a
    leave-one-out plan a model without example i sees its seed's full-model order with i removed.
    `on_epoch(epoch)` follows every epoch (progress). Each model's forgetting events over its subset are
    counted from the correctness of its training forward pass on every batch (no extra pass).
    """
    training = recipe(plan.settings["training"])
    device = torch.device(device)
    masks = torch.as_tensor(plan.inclusion_mask[model_ids], device=device)
    subset = torch.stack([m.nonzero()[:, 0] for m in masks])  # [K, m]: rows each model trains on
    ensemble = build_ensemble(build_backbones(plan, model_ids, data, device), training)
    orders = [torch.Generator(device="cpu").manual_seed(int(plan.model_seed[i]) + 1) for i in model_ids]
    augmentations = [torch.Generator(device="cpu").manual_seed(int(plan.model_seed[i]) + 2) for i in model_ids]
    size, batch = subset.shape[1], training.batch_size
    schedule = build_schedule(ensemble.optimizer, training.lr_schedule, math.ceil(size / batch), training.n_epochs,
                              training.lr_milestones, training.lr_warmup)
    record = set(training.record_epochs)
    paired = plan.settings.get("kind") == "loo"
    recorded = {f"{k}_{s}": [] for k in ("prob", "correct") + (("logits",) if training.save_logits else ())
                for s in ("train", "test")}
    # Each model's correctness at every presentation of its subset's examples, from its training forward pass.
    forgetting = ForgettingEvents(len(data.train_labels), device, rows=ensemble.size)
    correct = torch.empty(ensemble.size, size, dtype=torch.bool, device=device)  # an epoch's, written by each step
    columns = [correct[:, start:start + batch] for start in range(0, size, batch)]  # each step's, made once
    # The step from which each example stayed correct in its training passes (-1: not correct at its last one,
    # or never presented): the online proxy of the memorization-aware replay model (models/_memorization_proxy.py).
    learned_step = torch.full((ensemble.size, len(data.train_labels)), -1, dtype=torch.int64, device=device)
    step_of_position = torch.arange(size, device=device) // batch  # an epoch's position → its step in the epoch
    ensemble.train(True)
    inputs = TrainingInputs(data, augmentations)
    for epoch in range(1, training.n_epochs + 1):
        rows = epoch_rows(masks, subset, orders, paired)
        for step, (x, y) in enumerate(inputs.epoch(rows, batch)):
            # the loss is only read at an epoch's end (below): computing it at every step cost 3% of a step
            loss, _ = ensemble.train_step(x, y, with_loss=step == len(columns) - 1, correct=columns[step])
            if not schedule.constant:  # a constant rate needs no step (10 µs)
                schedule.step()
        forgetting.count_once(rows, correct)  # an epoch presents each example of a model's subset once
        step = step_of_position + (epoch - 1) * len(columns)
        before = learned_step.gather(1, rows)
        learned_step.scatter_(1, rows, torch.where(correct, torch.where(before < 0, step, before), -1))
        if not math.isfinite(loss.item()):
            raise ConfigError(f"the training loss of models {model_ids[0]}..{model_ids[-1]} became {loss.item()} in "
                              f"epoch {epoch}; lower --lr (now {training.lr})")
        if epoch in record:
            for part, images, labels in (("train", data.train_images, data.train_labels),
                                          ("test", data.test_images, data.test_labels)):
                for key, value in predictions(ensemble, data, images, labels, training.save_logits).items():
                    recorded[f"{key}_{part}"].append(value)
        if on_epoch is not None:
            on_epoch(epoch)
    epochs = np.array(sorted(record), dtype=np.int64)
    counts = forgetting.arrays()
    return {model_id: {"epochs": epochs, **{key: np.stack([v[k] for v in values]) for key, values in recorded.items()},
                       "forget_events_train": counts["events"][k], "never_learned_train": counts["never_learned"][k],
                       "learned_step_train": learned_step[k].cpu().numpy()}
            for k, model_id in enumerate(model_ids)}


_LOADED: dict[tuple, tuple[Plan, PlanData]] = {}  # a worker process loads its data once, then reuses it


def train_and_store(store_dir: str, model_ids: list[int], data_path: str, device: str) -> dict:
    """A launcher's unit of work: train these models and write their files; returns timing for the driver."""
    store = SubsetStore(store_dir)
    key = (str(store_dir), data_path, device, store.plan_hash())  # a store's plan may be replaced meanwhile
    if key not in _LOADED:
        plan = store.load_plan()
        _LOADED.clear()
        _LOADED[key] = (plan, load_plan_data(plan, data_path, device))
    plan, data = _LOADED[key]
    if torch.device(device).type == "cpu":  # the plan's thread count: conv results depend on it
        torch.set_num_threads(plan.settings.get("grouping", {}).get("cpu_threads", 1))
    started = time.perf_counter()
    results = train_group(plan, model_ids, data, device,
                          on_epoch=lambda epoch: store.write_progress(model_ids[0], epoch))
    seconds = time.perf_counter() - started
    for model_id, arrays in results.items():
        store.write_model(model_id, plan.hash, **arrays)
    store.write_timing(model_ids, seconds)
    store.clear_progress(model_ids[0])
    return {"model_ids": model_ids, "seconds": seconds}
