"""Training the models of a subset-training plan, one at a time or as a vectorised ensemble (torch.func).

A worker rebuilds the dataset from the plan, trains a group of models on their subsets and writes
each model's predictions (softmax probability of the training label and 0/1 correctness, on every
training and test example, at every recorded epoch) into the store.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from backbones import BACKBONES
from datasets import DATASETS
from memorization.plan import Plan, fingerprint
from memorization.store import SubsetStore
from utils.errors import ConfigError
from utils.optimizers import build_optimizer

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
    for model_id in model_ids:
        torch.manual_seed(int(plan.model_seed[model_id]))  # a model's initialisation depends only on its seed
        nets.append(BACKBONES.get(settings["backbone"])(args, data.dataset.SHAPE, data.dataset.N_CLASSES).to(device))
    return nets


def has_batch_norm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


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

    With K > 1 the parameters are stacked ([K, ...] leaves) and the forward pass is vmapped, so one
    batched kernel serves every model; each model keeps its own parameters, gradients and optimizer
    state because the loss is a sum of per-model losses and every optimizer update is elementwise.
    """

    def __init__(self, nets: list[nn.Module], training: argparse.Namespace):
        self.size = len(nets)
        if self.size == 1:
            self.net = nets[0]
            self.parameters = list(self.net.parameters())
        else:
            if has_batch_norm(nets[0]):
                raise ConfigError("this backbone uses BatchNorm, whose running statistics cannot be updated inside a "
                                  "vectorised ensemble; use --ensemble 1, or a backbone without BatchNorm (mlp, vit)")
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

    def train(self, mode: bool = True) -> None:
        self.net.train(mode)

    def __call__(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        if self.size == 1:
            return self.net(x if shared_input else x[0])[None]
        forward = self._forward_shared if shared_input else self._forward
        return forward(self.params, self.buffers, x)


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


def train_group(plan: Plan, model_ids: list[int], data: PlanData, device: str) -> dict[int, dict[str, np.ndarray]]:
    """Train the models of one group (same subset ratio) together; returns each model's arrays."""
    training = argparse.Namespace(**plan.settings["training"])
    device = torch.device(device)
    started = time.perf_counter()
    masks = torch.as_tensor(plan.inclusion_mask[model_ids], device=device)
    subset = torch.stack([m.nonzero()[:, 0] for m in masks])  # [K, m]: rows each model trains on
    ensemble = Ensemble(build_backbones(plan, model_ids, data, device), training)
    generators = [torch.Generator(device="cpu").manual_seed(int(plan.model_seed[i]) + 1) for i in model_ids]
    size, batch = subset.shape[1], training.batch_size
    record = set(training.record_epochs)
    recorded = {f"{k}_{s}": [] for k in ("prob", "correct") + (("logits",) if training.save_logits else ())
                for s in ("train", "test")}
    ensemble.train(True)
    for epoch in range(1, training.n_epochs + 1):
        order = torch.stack([torch.randperm(size, generator=g) for g in generators]).to(device)
        rows = subset.gather(1, order)  # [K, m], each model's own shuffle of its own subset
        for start in range(0, size, batch):
            step_rows = rows[:, start:start + batch]
            x = data.dataset.train_transform(data.train_images.index_select(0, step_rows.reshape(-1)))
            x = x.view(ensemble.size, -1, *x.shape[1:])
            y = data.train_labels[step_rows]
            with autocast(device):
                logits = ensemble(x).float()
            # Sum of per-model mean losses: each model's gradient is that of its own mean loss.
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y).mean(1).sum()
            ensemble.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ensemble.optimizer.step()
        if not math.isfinite(loss.item()):
            raise ConfigError(f"the training loss of models {model_ids[0]}..{model_ids[-1]} became {loss.item()} in "
                              f"epoch {epoch}; lower --lr (now {training.lr})")
        if epoch in record:
            for part, images, labels in (("train", data.train_images, data.train_labels),
                                          ("test", data.test_images, data.test_labels)):
                for key, value in predictions(ensemble, data, images, labels, training.save_logits).items():
                    recorded[f"{key}_{part}"].append(value)
    seconds = (time.perf_counter() - started) / len(model_ids)
    epochs = np.array(sorted(record), dtype=np.int64)
    return {model_id: {"epochs": epochs, "train_seconds": np.float64(seconds),
                       **{key: np.stack([v[k] for v in values]) for key, values in recorded.items()}}
            for k, model_id in enumerate(model_ids)}


_LOADED: dict[tuple, tuple[Plan, PlanData]] = {}  # a worker process loads its data once, then reuses it


def train_and_store(store_dir: str, model_ids: list[int], data_path: str, device: str) -> dict:
    """A launcher's unit of work: train these models and write their files; returns timing for the driver."""
    store = SubsetStore(store_dir)
    key = (str(store_dir), data_path, device)
    if key not in _LOADED:
        plan = store.load_plan()
        _LOADED.clear()
        _LOADED[key] = (plan, load_plan_data(plan, data_path, device))
    plan, data = _LOADED[key]
    started = time.perf_counter()
    results = train_group(plan, model_ids, data, device)
    for model_id, arrays in results.items():
        store.write_model(model_id, plan.hash, **arrays)
    return {"model_ids": model_ids, "seconds": time.perf_counter() - started}
