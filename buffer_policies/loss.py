"""loss: keep the examples the network found hardest (or easiest) when they were offered.

Each offered example is scored by its cross-entropy under the network at the moment of insertion (eval
mode, unaugmented image: `Offered.loss`). Empty slots fill front to back; once the buffer is full, the
stored examples and the offered ones compete on those scores and the buffer keeps the `capacity`
highest (`--loss_keep high`: hard, often atypical or mislabeled examples) or lowest (`low`: typical
ones). A stored example keeps the score it had when it was stored. A score-based selection of this
kind is a cheap, single-run stand-in for memorization-aware selection (compare `--buffer_policy max`
with precomputed scores).
"""
from __future__ import annotations

import torch

from buffer_policies import BufferPolicy, register_policy


@register_policy("loss")
class LossRanked(BufferPolicy):
    @staticmethod
    def add_args(parser):
        parser.add_argument("--loss_keep", choices=("high", "low"), default="high",
                            help="keep the examples of highest (hard) or lowest (easy) loss at insertion")

    def __init__(self, args):
        super().__init__(args)
        self.scores: torch.Tensor | None = None  # loss of each stored example when it was stored

    def insert(self, buffer, offered):
        loss = offered.loss.detach().float()
        device = loss.device
        if self.scores is None:
            self.scores = torch.zeros(buffer.capacity, device=device)
        stored, capacity = len(buffer), buffer.capacity
        sign = 1.0 if self.args.loss_keep == "high" else -1.0
        pool = torch.cat([self.scores[:stored], loss]) * sign  # the stored examples, then the offered rows
        kept = torch.zeros(len(pool), dtype=torch.bool, device=device)
        kept[torch.topk(pool, min(capacity, len(pool)), sorted=False).indices] = True
        rows = torch.nonzero(kept[stored:]).flatten()
        free = torch.arange(stored, capacity, device=device)
        evicted = torch.nonzero(~kept[:stored]).flatten()
        slots = torch.cat([free, evicted])[: len(rows)]  # empty slots first, then those of evicted examples
        self.scores[slots] = loss[rows]
        return slots, rows
