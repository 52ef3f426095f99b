"""der: Dark Experience Replay — match the logits the buffer stored when each example was inserted."""
import torch

from models import ContinualModel, register_model


@register_model("der")
class Der(ContinualModel):
    USES_BUFFER = True

    @staticmethod
    def add_args(parser):
        parser.add_argument("--alpha", type=float, default=0.3,
                            help="weight of the logit-matching (MSE) replay loss (DER paper, seq-cifar10: 0.3)")

    def replay_loss(self) -> torch.Tensor:
        return self.args.alpha * self.replay_logit_loss()

    def observe(self, inputs, labels, not_aug_inputs, indices, task):
        outputs = self.net(inputs)
        loss = self.loss(outputs, labels)
        if not self.buffer.is_empty():
            loss = loss + self.replay_loss()
        self.buffer.add_data(not_aug_inputs, labels, logits=outputs.detach(), indices=indices,
                             task_labels=torch.full_like(indices, task))
        return loss
