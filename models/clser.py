"""clser: CLS-ER, experience replay with a plastic and a stable semantic memory.

E. Arani, F. Sarfraz, B. Zonooz, "Learning Fast, Learning Slow: A General Continual Learning Method based
on Complementary Learning System", ICLR 2022.

The working network trains as in ER: one cross-entropy over the stream batch with a buffer batch appended.
Two exponential moving averages of the working network act as semantic memories, a plastic one (updated
often) and a stable one (updated rarely). After every optimizer step each memory is updated with its own
probability (--plastic_model_update_freq, --stable_model_update_freq: one torch.rand draw each, plastic
first, from the global generator) towards the working network, with decay
min(1 − 1/(s + 1), alpha), s the number of optimizer steps taken so far in the run (1 after the first) and
alpha its --plastic_model_alpha or --stable_model_alpha. On the buffer batch both memories give logits; per
example the target is the logits of the memory that gives the example's true class the higher softmax
probability (the plastic one on a tie), and --reg_weight times the mean squared error between the working
network's logits on the buffer batch (a forward pass of its own) and these targets is added to the loss.
Evaluation (model.eval(); model(x)) uses the stable memory.

Flags, defaults and the update rule follow the authors' Mammoth-based implementation (NeurAI-Lab/CLS-ER,
models/clser.py; aimagelab/mammoth has no clser). The memories are timm's ModelEmaV3 copies, which
run in the model's mode as the reference's deepcopies do. Departure: they average the network's buffers
(BatchNorm running statistics) with the same decay, where the reference averages parameters only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models import ContinualModel, register_model
from utils.lifecycle import StepBatch


@register_model("clser")
class Clser(ContinualModel):
    """ER plus consistency to the better of two EMA memories; evaluation with the stable memory."""

    USES_BUFFER = True
    BOUNDS = {"reg_weight": "[0, inf)",
              "stable_model_update_freq": "[0, 1]", "stable_model_alpha": "[0, 1]",
              "plastic_model_update_freq": "[0, 1]", "plastic_model_alpha": "[0, 1]"}

    @staticmethod
    def add_args(parser):
        parser.add_argument("--reg_weight", type=float, default=0.1,
                            help="weight of the consistency loss (MSE to the chosen memory's logits on buffer "
                                 "samples; CLS-ER's default 0.1)")
        parser.add_argument("--stable_model_update_freq", type=float, default=0.7,
                            help="probability of updating the stable memory after a step (CLS-ER's default 0.7)")
        parser.add_argument("--stable_model_alpha", type=float, default=0.999,
                            help="largest EMA decay of the stable memory (CLS-ER's default 0.999)")
        parser.add_argument("--plastic_model_update_freq", type=float, default=0.9,
                            help="probability of updating the plastic memory after a step (CLS-ER's default 0.9)")
        parser.add_argument("--plastic_model_alpha", type=float, default=0.999,
                            help="largest EMA decay of the plastic memory (CLS-ER's default 0.999)")

    def __init__(self, backbone, dataset, args):
        super().__init__(backbone, dataset, args)
        from timm.utils import ModelEmaV3  # imported here: timm and torchvision cost every run 2 s to import

        self.plastic_model = ModelEmaV3(self.net).requires_grad_(False)
        self.stable_model = ModelEmaV3(self.net).requires_grad_(False)

    def forward(self, x):
        return self.net(x) if self.training else self.stable_model(x)

    @torch.no_grad()
    def consistency_target(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per example, the logits of the memory whose softmax gives the true class more probability."""
        stable, plastic = self.stable_model(images), self.plastic_model(images)
        rows = labels[:, None]
        stable_wins = F.softmax(stable, 1).gather(1, rows) > F.softmax(plastic, 1).gather(1, rows)
        return torch.where(stable_wins, stable, plastic)

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        all_inputs, all_labels = inputs, labels
        consistency = 0.0
        if not self.buffer.is_empty():
            replay = self.buffer.get_data(self.args.minibatch_size, transform=self.transform)
            buf_inputs, buf_labels = replay["examples"], replay["labels"]
            target = self.consistency_target(buf_inputs, buf_labels)
            consistency = self.args.reg_weight * F.mse_loss(self.net(buf_inputs), target)
            all_inputs = torch.cat((inputs, buf_inputs))
            all_labels = torch.cat((labels, buf_labels))
        loss = consistency + self.loss(self.net(all_inputs), all_labels)
        self.buffer.add_data(not_aug_inputs, labels, indices=indices, task_labels=torch.full_like(indices, task))
        return loss

    def memory_decay(self, alpha: float, step: int) -> float:
        """The EMA decay after the run's `step`-th optimizer step (1-based)."""
        return min(1 - 1 / (step + 1), alpha)

    @torch.no_grad()
    def after_step(self, batch: StepBatch):
        step = batch.step + 1  # batch.step counts the steps before this one
        for memory, freq, alpha in ((self.plastic_model, self.args.plastic_model_update_freq,
                                     self.args.plastic_model_alpha),
                                    (self.stable_model, self.args.stable_model_update_freq,
                                     self.args.stable_model_alpha)):
            if torch.rand(1).item() < freq:
                # ModelEmaV3.update takes no decay; its warm-up is not the reference's, so pass the decay here.
                memory.apply_update_(self.net, self.memory_decay(alpha, step))
