"""pnn: Progressive Neural Networks.

A. A. Rusu, N. C. Rabinowitz, G. Desjardins, H. Soyer, J. Kirkpatrick, K. Kavukcuoglu, R. Pascanu,
R. Hadsell, "Progressive Neural Networks", arXiv:1606.04671, 2016.

Each task gets a column of its own: a fresh network of the --backbone's shape (the mlp, initialised as
--backbone mlp initialises it). Before every task after the first, every parameter so far is frozen and a
new column is added whose hidden layers after the first, and head, also receive lateral adapters from the
layer below in every earlier column (backbones/_pnn_mlp.py: α ⊙ h, V, ReLU, U). Training minimises the
cross-entropy of the newest column's logits over all classes, as Mammoth's pnn does, with a new optimizer
over the new column and its adapters only, so the earlier columns never change and nothing is forgotten.
A test example is predicted through the column of its task: the model is task-aware (TASK_AWARE), and the
evaluation calls it as `model(images, task)` on each task's split. Outside the task's classes its logits
are -inf, as in Mammoth's `forward(x, task_label)`.

The method needs the task at test time, so it is task-incremental only: a domain-IL dataset (no task's
classes of its own) is refused, and its class-IL accuracy is reported as 0, as Mammoth's evaluation
reports it for models without class-IL compatibility; read acc_task_il.

Where it differs from Mammoth's code (models/pnn.py, backbone/MNISTMLP_PNN.py at e75a491): Mammoth's
MNISTMLP_PNN builds the adapters but sets `self.old_cols = []` and branches on it, so its forward never
takes the lateral path and each of its columns is an independent network; this module uses the laterals,
as the paper and Mammoth's adapter code describe. Mammoth feeds a column's adapters with copies of the
earlier columns' own layers (without their laterals); here the earlier columns' activations are their
whole forward passes, as in the paper (the two agree up to the second column; benchmarks/
mammoth_parity_pnn.py compares them). α is a vector over the units, drawn in [0, 0.1), as Mammoth's
AlphaModule (the paper: a scalar). Only the mlp backbone has columns here (Mammoth also has a
ResNet-18 PNN).
"""
from __future__ import annotations

import torch

from backbones import BACKBONES
from backbones._pnn_mlp import ProgressiveMLP
from datasets import DATASETS
from models import ContinualModel, register_model
from utils.errors import ConfigError
from utils.optimizers import build_optimizer


@register_model("pnn")
class Pnn(ContinualModel):
    """A frozen column per finished task, a new column with lateral adapters per task; predicts per task."""

    TASK_AWARE = True  # the evaluation passes each split's task: model(images, task)

    @classmethod
    def check_args(cls, args):
        dataset = DATASETS.get(args.dataset)
        if dataset.SETTING == "domain-il":
            raise ConfigError(f"pnn predicts through the column of each example's task, which needs tasks with "
                              f"classes of their own, but {args.dataset} is domain-incremental; pick a "
                              f"class-incremental dataset (e.g. seq-mnist), whose tasks pnn learns task-IL")
        if args.backbone != "mlp":
            raise ConfigError(f"pnn builds its columns from the mlp backbone only, not {args.backbone}; pass "
                              f"--backbone mlp")
        plain = getattr(args, "mlp_norm", "none") == "none" and getattr(args, "mlp_activation", "relu") == "relu"
        if not plain or not str(args.mlp_hidden).strip(","):
            raise ConfigError("pnn's columns are plain ReLU mlps with at least one hidden layer; drop --mlp_norm and "
                              "--mlp_activation and give --mlp_hidden at least one width")
        if args.plasticity or args.covariates:
            raise ConfigError("pnn adds a network column per task, which --plasticity methods and --covariates, "
                              "bound to the network's first parameters, do not follow; drop them")
        if args.mem_scores is not None:
            raise ConfigError("pnn has no class-IL prediction, so the class-IL accuracy per memorization bucket "
                              "that --mem_scores adds would be 0; drop --mem_scores")

    def __init__(self, backbone, dataset, args):
        super().__init__(ProgressiveMLP(backbone), dataset, args)

    def add_column(self) -> None:
        """Freeze everything so far, append a column of the backbone's shape with its adapters, and train only
        the new one from here (a new optimizer, as Mammoth makes one per column)."""
        for p in self.net.parameters():
            p.requires_grad_(False)
        column = BACKBONES.get(self.args.backbone)(self.args, self.dataset.SHAPE, self.dataset.N_CLASSES)
        self.net.add_column(column.to(self.device))
        self.net.adapters[-1].to(self.device)
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = build_optimizer(trainable, self.args)

    def begin_task(self, task):
        while len(self.net.columns) <= task:
            self.add_column()

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        return self.loss(self.net(inputs), labels)

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """The logits of the task's column, -inf outside the task's classes."""
        if task is None:
            raise ConfigError("pnn predicts through the column of the examples' task; call model(images, task), "
                              "as the evaluation does for a TASK_AWARE model")
        out = self.net(x, task)
        classes = self.dataset.task_classes(task)
        outside = torch.ones(out.shape[1], dtype=torch.bool, device=out.device)
        outside[classes.start:classes.stop] = False
        return out.masked_fill(outside, float("-inf"))

    def load_checkpoint_state(self, state):
        """Grow the columns the saved run had (and the optimizer over the newest) before loading their weights."""
        saved = state["modules"]["net"]["state"]
        n_columns = len({key.split(".")[1] for key in saved if key.startswith("columns.")})
        while len(self.net.columns) < n_columns:
            self.add_column()
        super().load_checkpoint_state(state)
