"""Helpers shared by the methods that choose their exemplars themselves at the end of a task (icarl, bic,
xder) instead of through a --buffer_policy: rewriting the buffer, herding, class-balanced reduction,
frozen copies of the network, batched forward passes and batch-norm statistics control."""
from __future__ import annotations

import argparse
import copy
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from buffer_policies import Buffer
from datasets import DATASETS
from utils.errors import ConfigError


def check_task_share(name: str, args: argparse.Namespace) -> None:
    """Refuse, with one sentence, a buffer too small to keep --buffer_size // n_tasks >= 1 examples of each task."""
    n_tasks = args.n_tasks if args.n_tasks is not None else DATASETS.get(args.dataset).N_TASKS
    if args.buffer_size < n_tasks:
        raise ConfigError(f"{name} keeps --buffer_size // n_tasks examples of each task, none with --buffer_size "
                          f"{args.buffer_size} over {n_tasks} tasks; pass --buffer_size of at least {n_tasks}")


def check_class_incremental(name: str, args: argparse.Namespace) -> None:
    """Refuse, with one sentence, a dataset that is not class-incremental or a buffer without a slot per class."""
    dataset = DATASETS.get(args.dataset)
    if dataset.SETTING != "class-il":
        raise ConfigError(f"{name} is a class-incremental method, but {args.dataset} is {dataset.SETTING}; "
                          f"choose a class-incremental dataset (e.g. seq-digits)")
    if args.buffer_size < dataset.N_CLASSES:
        raise ConfigError(f"{name} keeps exemplars of every class, so --buffer_size must be at least the "
                          f"{dataset.N_CLASSES} classes of {args.dataset}, got {args.buffer_size}")
    if args.buffer_policy != "reservoir":
        raise ConfigError(f"{name} chooses its exemplars itself at the end of each task, so --buffer_policy "
                          f"{args.buffer_policy} would have no effect; leave --buffer_policy at its default")


def rewrite_buffer(buffer: Buffer, rows: dict[str, torch.Tensor]) -> None:
    """Make the buffer hold exactly `rows` (field name → tensor, one row per example) in slots 0, 1, ...;
    fields it has not stored yet are allocated at the buffer's capacity."""
    n = len(rows["labels"])
    if n > buffer.capacity:
        raise ValueError(f"{n} exemplars do not fit a buffer of {buffer.capacity} slots")
    for name, values in rows.items():
        if getattr(buffer, name) is None:
            setattr(buffer, name, torch.zeros((buffer.capacity, *values.shape[1:]), dtype=values.dtype,
                                              device=buffer.device))
    buffer.write_rows(0, rows, torch.arange(n))
    buffer.keep_first(n)


def stored_rows(buffer: Buffer, slots: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored fields of the given slots."""
    return {name: values[slots] for name, values in buffer.get_all().items()}


def concat_rows(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate row dictionaries field by field (fields missing from a part are dropped)."""
    parts = [p for p in parts if len(p["labels"])]
    if not parts:
        return {}
    names = set.intersection(*(set(p) for p in parts))
    return {name: torch.cat([p[name] for p in parts]) for name in sorted(names)}


def first_per_group(groups: torch.Tensor, keep: int) -> torch.Tensor:
    """Positions of the first `keep` entries of each group value, in their original order (how iCaRL,
    BiC and X-DER shrink a buffer: the exemplars stored first, the most representative for iCaRL, stay)."""
    positions = []
    for value in torch.unique(groups):
        positions.append(torch.nonzero(groups == value).flatten()[:keep])
    if not positions:
        return torch.zeros(0, dtype=torch.long, device=groups.device)
    return torch.sort(torch.cat(positions)).values


def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """iCaRL's exemplar selection (Rebuffi et al. 2017, Algorithm 4): pick, one at a time, the example
    whose addition brings the mean of the picked examples closest to the mean of all `features`
    [N, D]; returns the indices of the first min(m, N) picks, in the order they were picked."""
    mean = features.mean(0)
    running = torch.zeros_like(mean)
    available = torch.ones(len(features), dtype=torch.bool, device=features.device)
    picked = []
    for k in range(min(m, len(features))):
        cost = (mean - (features + running) / (k + 1)).norm(dim=1)
        cost = cost.masked_fill(~available, float("inf"))
        index = int(cost.argmin())
        picked.append(index)
        running = running + features[index]
        available[index] = False
    return torch.tensor(picked, dtype=torch.long, device=features.device)


def frozen_copy(net: nn.Module) -> nn.Module:
    """A copy of the network in evaluation mode without gradients (the previous model that a method
    distils from). Evaluation mode also keeps the copy out of the plasticity statistics, which only
    count training-mode forward passes."""
    old = copy.deepcopy(net)
    old.eval()
    for p in old.parameters():
        p.requires_grad_(False)
    return old



def in_batches(function: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
               batch_size: int) -> torch.Tensor:
    """function applied to consecutive slices of `images`, concatenated."""
    if len(images) == 0:
        return function(images)
    return torch.cat([function(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextmanager
def frozen_bn_statistics(net: nn.Module, frozen: bool = True) -> Iterator[None]:
    """While `frozen`, batch-norm layers in training mode normalise by the batch's own statistics
    without updating their running averages (Mammoth's bn_track_stats(net, False))."""
    layers = [m for m in net.modules() if isinstance(m, _BATCH_NORMS)] if frozen else []
    saved = [m.track_running_stats for m in layers]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, value in zip(layers, saved):
            m.track_running_stats = value


@contextmanager
def batch_statistics_mode(net: nn.Module) -> Iterator[None]:
    """Forward passes outside the training step as Mammoth's X-DER makes them at the end of a task
    (training mode, running statistics frozen), but with every layer other than batch norm in
    evaluation mode, so that they neither draw dropout nor count as training steps for the
    plasticity statistics."""
    was_training = net.training
    net.eval()
    layers = [m for m in net.modules() if isinstance(m, _BATCH_NORMS)]
    for m in layers:
        m.train()
    try:
        with frozen_bn_statistics(net):
            yield
    finally:
        net.train(was_training)
