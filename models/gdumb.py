"""gdumb: Greedy sampler and Dumb learner (GDumb).

A. Prabhu, P. H. S. Torr, P. K. Dokania, "GDumb: A Simple Approach that Questions Our Progress in
Continual Learning", ECCV 2020.

The stream only feeds a greedy class-balanced memory (`observe` makes no step); the learner is the
network trained from scratch on the memory alone: re-initialised, then --fitting_epochs epochs of SGD
(momentum --optim_mom, weight decay --optim_wd) whose learning rate warms up at --maxlr / 10 for one
epoch, is --maxlr for the next, and then follows cosine annealing with warm restarts (periods 1, 2,
4, ... epochs) down to --minlr, with CutMix at probability 0.5 when --cutmix_alpha > 0: Mammoth's
gdumb recipe. --lr is not used.

Mammoth fits only after the last task; here the learner is fitted after every task by default
(--fit_after every_task) so each row of the accuracy matrix is GDumb's answer at that point, as in
the paper, where the learner is retrained whenever it is queried. The last fit is the same (from
scratch on the final memory) either way; --fit_after last_task gives Mammoth's schedule.

Mammoth's gdumb fills a plain reservoir buffer rather than the paper's class-balanced sampler;
--gdumb_sampler reservoir gives that memory.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from buffer_policies import BUFFER_POLICIES, Buffer, BufferPolicy
from models import ContinualModel, register_model
from plasticity import method_names
from utils.errors import ConfigError

CUTMIX_PROB = 0.5  # Mammoth's cutmix_data default (and the GDumb code's)


class GreedyClassBalanced(BufferPolicy):
    """GDumb's sampler: while the memory has room, every example is stored; once it is full, an example
    of class c is stored only if c holds fewer than capacity / (classes seen so far) examples, in place
    of a random stored example of the largest class (ties: a random one of the largest classes)."""

    NAME = "gdumb_greedy"

    def __init__(self, args):
        super().__init__(args)
        self.capacity = 0
        self.filled = 0
        self.members: list[list[int]] = []  # per class: its slots
        self.seen: list[bool] = []  # per class: has it appeared in the stream

    def insert(self, buffer, offered):
        self.capacity = buffer.capacity
        host = offered.labels.detach().to("cpu", torch.long).tolist()
        if host and min(host) < 0:
            raise ValueError(f"the GDumb sampler needs non-negative class labels, got {min(host)}")
        extra = max(host, default=-1) + 1 - len(self.members)
        if extra > 0:
            self.members += [[] for _ in range(extra)]
            self.seen += [False] * extra
        draws = torch.rand(len(host), dtype=torch.float64).tolist()  # one uniform per row, CPU generator
        owner: dict[int, int] = {}  # slot -> the last row of the batch written there
        n_classes = sum(self.seen)
        for row, (c, u) in enumerate(zip(host, draws)):
            if not self.seen[c]:
                self.seen[c] = True
                n_classes += 1
            if self.filled < self.capacity:
                slot = self.filled
                self.filled += 1
            elif len(self.members[c]) < self.capacity / n_classes:
                slot = self._evict_from_largest(u)
            else:
                continue
            self.members[c].append(slot)
            owner[slot] = row
        slots = sorted(owner)
        device = offered.labels.device
        return (torch.tensor(slots, dtype=torch.long, device=device),
                torch.tensor([owner[s] for s in slots], dtype=torch.long, device=device))

    def _evict_from_largest(self, u: float) -> int:
        """Remove and return a uniformly random slot of a uniformly random largest class."""
        most = max(len(m) for m in self.members)
        largest = [k for k, m in enumerate(self.members) if len(m) == most]
        k = min(int(u * len(largest) * most), len(largest) * most - 1)
        members = self.members[largest[k // most]]
        j = k % most
        slot = members[j]
        members[j] = members[-1]
        members.pop()
        return slot

    def class_counts(self) -> list[int]:
        return [len(m) for m in self.members]

    def state_dict(self):
        return {"capacity": self.capacity, "filled": self.filled, "members": [list(m) for m in self.members],
                "seen": list(self.seen)}

    def load_state_dict(self, state):
        self.capacity, self.filled = int(state["capacity"]), int(state["filled"])
        self.members = [[int(s) for s in m] for m in state["members"]]
        self.seen = [bool(s) for s in state["seen"]]


def cutmix(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al., ICCV 2019) as Mammoth's cutmix_data: with probability 0.5, paste a box of a shuffled
    copy of the batch into it; returns the images, the pasted images' labels and the kept-area fraction λ."""
    if torch.rand(()).item() > CUTMIX_PROB:
        return x, y, 1.0
    lam = torch.distributions.Beta(alpha, alpha).sample().item()
    index = torch.randperm(len(x), device=x.device)
    height, width = x.shape[2], x.shape[3]
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = torch.randint(height, ()).item(), torch.randint(width, ()).item()
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    x = x.clone()
    x[:, :, y1:y2, x1:x2] = x[index, :, y1:y2, x1:x2]
    return x, y[index], 1.0 - (y2 - y1) * (x2 - x1) / (height * width)


@register_model("gdumb")
class GDumb(ContinualModel):
    """A greedy class-balanced memory and a network trained from scratch on it after each task."""

    USES_BUFFER = True
    # --minlr's upper end is --maxlr, checked in check_args
    BOUNDS = {"maxlr": "(0, inf)", "minlr": "[0, inf)", "fitting_epochs": "[1, inf)", "cutmix_alpha": "[0, inf)"}

    @staticmethod
    def add_args(parser):
        parser.add_argument("--maxlr", type=float, default=5e-2,
                            help="learning rate of the fit on the memory after its warm-up epoch (Mammoth's gdumb)")
        parser.add_argument("--minlr", type=float, default=5e-4,
                            help="lowest learning rate of the fit's cosine schedule (Mammoth's gdumb)")
        parser.add_argument("--fitting_epochs", type=int, default=256,
                            help="epochs of the fit on the memory (Mammoth's gdumb)")
        parser.add_argument("--cutmix_alpha", type=float, default=0.0,
                            help="Beta(α, α) of the fit's CutMix; 0 turns it off (the default of Mammoth's gdumb "
                                 "in the DER and X-DER papers' code; its current default is 1)")
        parser.add_argument("--fit_after", choices=("every_task", "last_task"), default="every_task",
                            help="fit the learner after every task (the paper) or only after the last (Mammoth)")
        parser.add_argument("--gdumb_sampler", choices=("balanced", "reservoir"), default="balanced",
                            help="the memory: the paper's greedy class-balanced sampler, or a plain reservoir "
                                 "buffer (Mammoth's gdumb)")

    @classmethod
    def check_args(cls, args):
        if args.buffer_policy != "reservoir":
            raise ConfigError(f"gdumb fills its memory with its own sampler (--gdumb_sampler); drop "
                              f"--buffer_policy {args.buffer_policy}")
        super().check_args(args)
        checks = [
            (args.n_epochs == 1, f"gdumb's sampler sees the stream once and the learner trains on the memory for "
                                 f"--fitting_epochs, so pass --n_epochs 1 (got {args.n_epochs})"),
            (not method_names(args.plasticity), f"gdumb trains outside the task loop's optimizer step, where "
                                                f"--plasticity {args.plasticity} would never run; drop it"),
            (args.minlr <= args.maxlr, f"--minlr must lie in [0, --maxlr], got {args.minlr} with --maxlr "
                                       f"{args.maxlr}; pass a --minlr of at most {args.maxlr}"),
        ]
        for ok, sentence in checks:
            if not ok:
                raise ConfigError(sentence)

    def __init__(self, backbone, dataset, args):
        super().__init__(backbone, dataset, args)
        balanced = args.gdumb_sampler == "balanced"
        sampler = GreedyClassBalanced(args) if balanced else BUFFER_POLICIES.get("reservoir")(args)
        self.buffer = Buffer(args.buffer_size, self.device, sampler, scorer=self.eval_logits)

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        self.buffer.add_data(not_aug_inputs, labels, indices=indices, task_labels=torch.full_like(indices, task))
        return None

    def end_task(self, task):
        if self.args.fit_after == "every_task" or task == self.dataset.n_tasks - 1:
            self.fit()

    def fit(self) -> None:
        """Re-initialise the network and train it on the memory alone (Mammoth's fit_buffer)."""
        args = self.args
        was_training = self.net.training
        self.net.train()
        self.net.reinitialize_()
        opt = torch.optim.SGD(self.net.parameters(), lr=args.maxlr, momentum=args.optim_mom,
                              weight_decay=args.optim_wd)
        schedule = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=1, T_mult=2, eta_min=args.minlr)
        for epoch in range(args.fitting_epochs):
            if epoch <= 1:  # one warm-up epoch at a tenth of the rate, then the full rate
                for group in opt.param_groups:
                    group["lr"] = args.maxlr * (0.1 if epoch == 0 else 1.0)
            else:
                schedule.step()
            data = self.buffer.get_data(len(self.buffer), transform=self.transform)
            for start in range(0, len(data["labels"]), args.batch_size):
                x = data["examples"][start:start + args.batch_size]
                y = data["labels"][start:start + args.batch_size]
                opt.zero_grad(set_to_none=True)
                if args.cutmix_alpha > 0:
                    x, y_pasted, lam = cutmix(x, y, args.cutmix_alpha)
                    outputs = self.net(x)
                    loss = lam * F.cross_entropy(outputs, y) + (1 - lam) * F.cross_entropy(outputs, y_pasted)
                else:
                    loss = F.cross_entropy(self.net(x), y)
                loss.backward()
                opt.step()
        self.net.train(was_training)

    def task_record(self, task):
        counts = torch.bincount(self.buffer.get_all()["labels"].cpu()).tolist() if len(self.buffer) else []
        return {"metrics": {f"buffer_count_class_{c}": n for c, n in enumerate(counts) if n}}
