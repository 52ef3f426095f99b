"""derpp: DER++ — DER's logit matching plus cross-entropy on a second buffer batch."""
import torch

from models import ContinualModel, register_model


@register_model("derpp")
class Derpp(ContinualModel):
    USES_BUFFER = True

    @staticmethod
    def add_args(parser):
        parser.add_argument("--alpha", type=float, default=0.2,
                            help="weight of the logit-matching (MSE) replay loss (DER paper, seq-cifar10 buffer 500: 0.2)")
        parser.add_argument("--beta", type=float, default=0.5,
                            help="weight of the replayed cross-entropy loss (DER paper, seq-cifar10 buffer 500: 0.5)")

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        outputs = self.net(inputs)
        loss = self.loss(outputs, labels)
        if not self.buffer.is_empty():
            loss = loss + self.args.alpha * self.replay_logit_loss() + self.args.beta * self.replay_label_loss()
        self.buffer.add_data(not_aug_inputs, labels, logits=outputs.detach(), indices=indices,
                             task_labels=torch.full_like(indices, task))
        return loss
