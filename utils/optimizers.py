"""The optimizers a run can name: SGD (with momentum) and Adam/AdamW."""
from __future__ import annotations

import argparse

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")


def build_optimizer(params, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The optimizer named by --optimizer: SGD with --optim_mom, or Adam/AdamW with --optim_eps."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.optim_mom, weight_decay=args.optim_wd)
    cls = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=args.lr, betas=(0.9, 0.999), eps=args.optim_eps, weight_decay=args.optim_wd)
