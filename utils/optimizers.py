"""The optimizers a run can name (SGD with momentum, Adam, AdamW) and the learning-rate schedules."""
from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

OPTIMIZERS = ("sgd", "adam", "adamw")


def build_optimizer(params, args: argparse.Namespace, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer named by --optimizer: SGD with --optim_mom (Nesterov's with --optim_nesterov, where the
    command has it), or Adam/AdamW with --optim_eps. `fused`: torch's fused kernel (one pass over each
    parameter; the same update up to float32 rounding, not the same bits as the default)."""
    import torch  # here, so that the command line can name the optimizers without importing torch

    fused = fused or None  # None: torch's default implementation
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.optim_mom, weight_decay=args.optim_wd,
                               nesterov=getattr(args, "optim_nesterov", False), fused=fused)
    cls = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=args.lr, betas=(0.9, 0.999), eps=args.optim_eps, weight_decay=args.optim_wd, fused=fused)


SCHEDULES = ("none", "multistep", "cosine", "onecycle")


def build_schedule(optimizer: torch.optim.Optimizer, schedule: str, steps_per_epoch: int, n_epochs: int,
                   milestones: list[float], warmup: float, gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A learning-rate factor per optimizer step (call `.step()` after every optimizer step; its `constant`
    is True where the factor is 1 at every step, and stepping it changes nothing).

    The first `warmup` fraction of all steps rises linearly to the full rate; then `none` keeps it,
    `multistep` multiplies it by `gamma` at each milestone (a fraction of the epochs, applied from
    that epoch on, as MultiStepLR stepped per epoch), `cosine` follows half a cosine to 0, and
    `onecycle` falls linearly to 0 (the one-cycle shape of Smith & Topin, and airbench's).
    """
    total = steps_per_epoch * n_epochs
    warm = round(warmup * total)
    boundaries = [round(m * n_epochs) for m in milestones]

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "multistep":
            return gamma ** sum(step // steps_per_epoch >= b for b in boundaries)
        progress = (step - warm) / max(1, total - warm)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "onecycle":
            return 1.0 - progress
        return 1.0

    import torch

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scheduler.constant = warm == 0 and schedule not in ("multistep", "cosine", "onecycle")
    return scheduler
